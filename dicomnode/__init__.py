"""dicomnode: a DICOM AI node for chest X-ray and chest CT studies."""

__version__ = "0.1.0"
