"""The SOP classes and transfer syntaxes the receiver accepts."""

from __future__ import annotations

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

#: Storage SOP classes for chest radiographs and chest CT (PS3.4 Annex B.5).
STORAGE_SOP_CLASSES: dict[str, UID] = {
    "Computed Radiography Image Storage": UID("1.2.840.10008.5.1.4.1.1.1"),
    "Digital X-Ray Image Storage - For Presentation": UID("1.2.840.10008.5.1.4.1.1.1.1"),
    "Digital X-Ray Image Storage - For Processing": UID("1.2.840.10008.5.1.4.1.1.1.1.1"),
    "CT Image Storage": UID("1.2.840.10008.5.1.4.1.1.2"),
    "Enhanced CT Image Storage": UID("1.2.840.10008.5.1.4.1.1.2.1"),
    "Legacy Converted Enhanced CT Image Storage": UID("1.2.840.10008.5.1.4.1.1.2.2"),
    "Secondary Capture Image Storage": UID("1.2.840.10008.5.1.4.1.1.7"),
    "Multi-frame Grayscale Byte Secondary Capture Image Storage": UID(
        "1.2.840.10008.5.1.4.1.1.7.2"
    ),
    "Multi-frame Grayscale Word Secondary Capture Image Storage": UID(
        "1.2.840.10008.5.1.4.1.1.7.3"
    ),
    "Multi-frame True Color Secondary Capture Image Storage": UID("1.2.840.10008.5.1.4.1.1.7.4"),
}

#: Every transfer syntax a modality commonly sends. Whichever the requestor
#: proposes first is accepted, and the data are stored exactly as received.
TRANSFER_SYNTAXES: list[UID] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]
