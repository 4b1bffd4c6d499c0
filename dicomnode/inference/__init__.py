"""Inference: the model registry and the pipeline steps (pre-process / predict / post-process).

Nothing here touches DICOM: steps take arrays and return arrays or small typed values.
"""
