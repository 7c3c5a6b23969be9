"""Shared forward and backward passes of dense softmax classifiers (logistic regression and ReLU MLPs).

Invariants: models are stateless (parameters are passed in, never stored or mutated); arithmetic runs in the
parameters' float dtype (float32 in production, float64 in gradient checks) and inputs are cast to it; the
loss is the mean softmax cross-entropy computed with a max-shifted log-sum-exp, so it is finite for any
finite logits.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from flcore.errors import FlcoreError
from flcore.models.spec import ModelSpec
from flcore.parameters import Parameters, ParameterSpec

__all__ = ["DenseSoftmaxClassifier", "log_softmax", "softmax_cross_entropy"]

_EVAL_BATCH = 8192

FloatArray = npt.NDArray[np.floating[Any]]


def log_softmax(logits: FloatArray) -> FloatArray:
    """Return row-wise log-softmax, stabilised by subtracting each row's maximum."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    result: FloatArray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return result


def softmax_cross_entropy(logits: FloatArray, y: npt.NDArray[np.integer[Any]]) -> tuple[float, FloatArray]:
    """Return the mean cross-entropy of integer labels ``y`` and its gradient with respect to ``logits``.

    The gradient is ``(softmax(logits) - onehot(y)) / n``.
    """
    n = logits.shape[0]
    log_probs = log_softmax(logits)
    rows = np.arange(n)
    loss = -float(log_probs[rows, y].sum(dtype=np.float64)) / n
    grad: FloatArray = np.exp(log_probs)
    grad[rows, y] -= 1.0
    grad /= n
    return loss, grad


class DenseSoftmaxClassifier:
    """Stack of dense layers with ReLU between them and a softmax cross-entropy head.

    With no hidden layers this is multinomial logistic regression. Subclasses choose the initialisation.

    Parameters
    ----------
    spec : ModelSpec
        The architecture and sizes.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self._spec = spec
        self._parameter_spec = spec.parameter_spec()
        self._num_layers = len(spec.layer_sizes) - 1

    @property
    def spec(self) -> ModelSpec:
        """The model's specification."""
        return self._spec

    def parameter_spec(self) -> ParameterSpec:
        """Names and shapes of the parameters."""
        return self._parameter_spec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._spec!r})"

    # Initialisation ------------------------------------------------------------------------------------

    def _init_limit(self, layer: int, fan_in: int, fan_out: int) -> float:
        """Half-width of the uniform distribution for the weights of ``layer``."""
        # Glorot & Bengio (2010), "Understanding the difficulty of training deep feedforward neural
        # networks", eq. 16: U[-sqrt(6 / (fan_in + fan_out)), +sqrt(6 / (fan_in + fan_out))].
        return math.sqrt(6.0 / (fan_in + fan_out))

    def init(self, rng: np.random.Generator) -> Parameters:
        """Draw initial parameters: uniform weights (see ``_init_limit``) and zero biases, as float32."""
        params: Parameters = {}
        sizes = self._spec.layer_sizes
        for i in range(self._num_layers):
            fan_in, fan_out = sizes[i], sizes[i + 1]
            limit = self._init_limit(i, fan_in, fan_out)
            params[f"layer{i}.weight"] = rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)
            params[f"layer{i}.bias"] = np.zeros(fan_out, dtype=np.float32)
        return params

    # Forward and backward ------------------------------------------------------------------------------

    def _check_inputs(self, params: Parameters, x: npt.NDArray[Any]) -> FloatArray:
        self._parameter_spec.validate(params)
        dtype = np.result_type(params["layer0.weight"].dtype, np.float32)
        x = np.asarray(x, dtype=dtype)
        if x.ndim != 2 or x.shape[1] != self._spec.input_dim:
            raise FlcoreError(f"Inputs have shape {x.shape}; the model expects (n, {self._spec.input_dim}).")
        return x

    def _check_labels(self, y: npt.NDArray[Any], n: int) -> npt.NDArray[np.int64]:
        y = np.asarray(y)
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
            raise FlcoreError(f"Labels have shape {y.shape} and dtype {y.dtype}; expected ({n},) integers.")
        if n and (y.min() < 0 or y.max() >= self._spec.num_classes):
            raise FlcoreError(
                f"Labels range over [{y.min()}, {y.max()}]; "
                f"the model expects [0, {self._spec.num_classes - 1}]."
            )
        return y.astype(np.int64, copy=False)

    def _forward(self, params: Parameters, x: FloatArray) -> tuple[FloatArray, list[FloatArray]]:
        """Return the logits and the input of every layer (post-activation), for backpropagation."""
        activations: list[FloatArray] = []
        h = x
        for i in range(self._num_layers):
            activations.append(h)
            z = h @ params[f"layer{i}.weight"].astype(h.dtype, copy=False) + params[f"layer{i}.bias"]
            h = np.maximum(z, 0) if i < self._num_layers - 1 else z
        return h, activations

    def logits(self, params: Parameters, x: npt.NDArray[Any]) -> FloatArray:
        """Return unnormalised class scores of shape ``(n, num_classes)``."""
        logits, _ = self._forward(params, self._check_inputs(params, x))
        return logits

    def forward(self, params: Parameters, x: npt.NDArray[Any]) -> FloatArray:
        """Alias of :meth:`logits`."""
        return self.logits(params, x)

    def loss_and_grad(
        self, params: Parameters, x: npt.NDArray[Any], y: npt.NDArray[np.integer[Any]]
    ) -> tuple[float, Parameters]:
        """Return the mean softmax cross-entropy over the batch and its gradient by backpropagation.

        Parameters
        ----------
        params : Parameters
            Current parameters (not modified).
        x : ndarray of shape (n, input_dim)
            Inputs, n >= 1.
        y : ndarray of shape (n,)
            Integer labels in ``[0, num_classes)``.

        Returns
        -------
        loss : float
            Mean cross-entropy.
        grad : Parameters
            Gradient with the same names, shapes and dtype as ``params``.
        """
        xs = self._check_inputs(params, x)
        if xs.shape[0] == 0:
            raise FlcoreError("Cannot compute a loss on an empty batch; expected at least one example.")
        labels = self._check_labels(np.asarray(y), xs.shape[0])
        logits, activations = self._forward(params, xs)
        loss, delta = softmax_cross_entropy(logits, labels)
        grads: Parameters = {}
        for i in reversed(range(self._num_layers)):
            h = activations[i]
            weight = params[f"layer{i}.weight"]
            grads[f"layer{i}.weight"] = (h.T @ delta).astype(weight.dtype, copy=False)
            grads[f"layer{i}.bias"] = delta.sum(axis=0).astype(weight.dtype, copy=False)
            if i > 0:
                # h = relu(z) of the previous layer, so h > 0 exactly where relu'(z) = 1.
                delta = (delta @ weight.T.astype(delta.dtype, copy=False)) * (h > 0)
        return loss, {name: grads[name] for name in self._parameter_spec.names}

    def predict(self, params: Parameters, x: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """Return the index of the largest logit for every row of ``x``."""
        xs = self._check_inputs(params, x)
        out = np.empty(xs.shape[0], dtype=np.int64)
        for start in range(0, xs.shape[0], _EVAL_BATCH):
            logits, _ = self._forward(params, xs[start : start + _EVAL_BATCH])
            out[start : start + _EVAL_BATCH] = logits.argmax(axis=1)
        return out

    def evaluate(
        self, params: Parameters, x: npt.NDArray[Any], y: npt.NDArray[np.integer[Any]]
    ) -> tuple[float, float]:
        """Return ``(mean cross-entropy, accuracy)`` over ``(x, y)``, computed in batches."""
        xs = self._check_inputs(params, x)
        n = xs.shape[0]
        if n == 0:
            raise FlcoreError("Cannot evaluate on an empty data set; expected at least one example.")
        labels = self._check_labels(np.asarray(y), n)
        total_loss = 0.0
        correct = 0
        for start in range(0, n, _EVAL_BATCH):
            logits, _ = self._forward(params, xs[start : start + _EVAL_BATCH])
            batch_labels = labels[start : start + _EVAL_BATCH]
            log_probs = log_softmax(logits)
            total_loss -= float(log_probs[np.arange(len(batch_labels)), batch_labels].sum(dtype=np.float64))
            correct += int((logits.argmax(axis=1) == batch_labels).sum())
        return total_loss / n, correct / n
