"""Django-free maths core of fedsite: parameters and their wire format, models, training, aggregation, data.

Invariants kept by every module in this package:

- Only numpy, the standard library and safetensors are imported at module level (scikit-learn only inside
  :func:`flcore.data.load_digits`); never Django, never pickle.
- Every function that draws randomness takes an explicit ``rng: numpy.random.Generator``.
- Model parameters are insertion-ordered ``dict[str, numpy.ndarray]`` of float32 arrays
  (:data:`flcore.parameters.Parameters`); functions that mutate an argument carry an ``_inplace`` suffix.
- Invalid input raises a subclass of :class:`flcore.errors.FlcoreError` (itself a ``ValueError``).
"""
