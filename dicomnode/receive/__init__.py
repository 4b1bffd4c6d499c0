"""The DICOM receiver: a pynetdicom AE (contexts, limits) and its event handlers."""
