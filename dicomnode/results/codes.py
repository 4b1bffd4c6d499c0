"""The coded concepts the result objects use, in one place, each with its source.

Schemes: ``SCT`` SNOMED CT, ``DCM`` the DICOM Controlled Terminology (PS3.16 Annex D),
``UCUM`` units. Class concepts come from the model manifests (``[[classes]]``), not
from here.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

#: Procedure Reported (TID 1500): the imaging procedure, not the algorithm.
#: SNOMED CT 399208008 |Plain chest X-ray (procedure)|, which covers every projection
#: (LOINC 36643-5 "XR Chest 2V" would claim two views, which a study need not have).
PLAIN_CHEST_XRAY = CodedConcept("399208008", "SCT", "Plain chest X-ray")

#: Procedure Reported of a chest CT report: SNOMED CT 169069000 |Computed tomography of
#: chest (procedure)| (the imaging procedure, with or without contrast).
CT_OF_CHEST = CodedConcept("169069000", "SCT", "Computed tomography of chest")

#: Value of the study-level finding's qualitative evaluation (the decision at the
#: manifest's threshold): SCT 52101004 "Present" or SCT 2667000 "Absent" (PS3.16 CID 230
#: "Yes-No", the SNOMED CT presence concepts).
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("2667000", "SCT", "Absent")

#: Unit of probabilities and confidences in [0, 1]: UCUM "1", as listed in PS3.16
#: CID 7181 (the same unit as ``codes.UCUM.NoUnits``).
UNITLESS = CodedConcept("1", "UCUM", "no units")

#: Finding type of an opacity box: DCM 112033 "Abnormal opacity" (PS3.16 CID 6101
#: "Chest Finding or Feature", from the Chest CAD SR).
ABNORMAL_OPACITY = CodedConcept("112033", "DCM", "Abnormal opacity")

#: Measurement of a box's confidence (the mean probability inside it):
#: DCM 111012 "Certainty of Finding" (the CAD SR concept for a finding's confidence).
CERTAINTY_OF_FINDING = CodedConcept("111012", "DCM", "Certainty of Finding")

#: Finding type of the lung region (the lung crop box): SCT 39607008 "Lung".
LUNG = CodedConcept.from_code(codes.SCT.Lung)

#: Finding categories (the "Finding category" row of TID 1501/1410).
ANATOMICAL_STRUCTURE = CodedConcept.from_code(codes.SCT.AnatomicalStructure)  # SCT 91723000
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = CodedConcept.from_code(
    codes.SCT.MorphologicallyAbnormalStructure
)  # SCT 49755003

#: Geometric purpose of every box ROI: SCT 75958009 "Bounded by" (PS3.16 CID 219):
#: the rectangle bounds the finding, it is not its outline.
BOUNDED_BY = CodedConcept.from_code(codes.SCT.BoundedBy)

#: Contributing Equipment purpose of reference of the node and of each model:
#: DCM 109102 "Processing Equipment" (PS3.16 CID 7005), the equipment that processed
#: the source images into this new instance. (DCM 109103 is "Modifying Equipment";
#: PS3.16 has no "Processing Algorithm" concept in CID 7005.)
PROCESSING_EQUIPMENT = CodedConcept.from_code(codes.DCM.ProcessingEquipment)

#: Observer type of the report's observation context: DCM 121007 "Device".
DEVICE = CodedConcept.from_code(codes.DCM.Device)

#: Finding type of the analysed region when the lung mask found no lungs (the whole
#: image was analysed): SCT "Chest" (pydicom's code dictionary).
CHEST = CodedConcept.from_code(codes.SCT.Chest)

#: Concept name of a measurement's INFERRED FROM SCOORD (TID 300 row 10):
#: DCM 111030 "Image Region".
IMAGE_REGION = CodedConcept.from_code(codes.DCM.ImageRegion)

#: Private coding scheme of the node's own concepts (PS3.16 8.2: a designator starting
#: with "99" is private; the code is named in the SR's Coding Scheme Identification).
PRIVATE_SCHEME = "99DICOMNODE"

#: Qualitative evaluation (value SCT "Present") of an image the out-of-domain gate flags:
#: it is unlike the images the model was validated on, so the report presents no findings
#: for it. No standard concept says this; hence the node's private code.
OUTSIDE_VALIDATED_DOMAIN = CodedConcept("OOD-1", PRIVATE_SCHEME, "Outside the validated domain")
