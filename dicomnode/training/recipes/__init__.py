"""Training recipes: each module here registers one :class:`dicomnode.training.Target`.

:func:`dicomnode.training.targets` imports every module of this package (names not
starting with ``_``). Modules must not import Keras or TensorFlow at module level.
"""
