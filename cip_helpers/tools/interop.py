"""A door for other people's attack code: a defense as a numpy function or an ART classifier.

Every :class:`~cip_helpers.method.defenses.Defense` (``NoDefense``, ``DP``, ``DAWN``, ``CIP``) is a torch
black box: ``defense(x)`` takes a float tensor of raw images (N, C, H, W) in [0, 1] and returns
(N, K) probability rows. Attack libraries speak numpy instead; this module converts at the door
and leaves every decision (checks, routing, poisoning, trigger sets) to the defense:

* :func:`numpy_predict`: ``f(x: np.ndarray) -> np.ndarray``, the form most attack code accepts.
* :func:`art_classifier`: an Adversarial Robustness Toolbox ``BlackBoxClassifier`` around it,
  for ART's extraction attacks (e.g. ``art.attacks.extraction.KnockoffNets``). ART is optional
  (``pip install -e .[art]``) and imported only when this function is called.

Each call of the returned function is ONE call of the defense, so per-call state
(``last_clean``, CIP's ``last_routes``, the trigger set) behaves exactly as for torch calls.
ART splits its queries into calls of ``batch_size`` images; its ``KnockoffNets`` defaults to
``batch_size_query=1`` (one image per call), which is slow: pass e.g. ``batch_size_query=256``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..method.defenses import Defense

if TYPE_CHECKING:  # pragma: no cover - only for type checkers; ART stays optional
    from art.estimators.classification import BlackBoxClassifier

ART_INSTALL_HINT = ("pip install adversarial-robustness-toolbox "
                    "(or, from the repository root, pip install -e .[art])")


def numpy_predict(defense: Defense) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap ``defense`` as a numpy-in, numpy-out prediction function.

    The returned ``predict(x)`` takes ``x``: an array (N, C, H, W), channels first, with
    (C, H, W) = ``defense.input_shape``, of raw images in [0, 1]. Floating arrays (float16,
    float32, float64) are cast to float32 first (the models' dtype: float64 would otherwise stop
    inside the model); any other dtype is handed over unchanged, so the defense's own check
    refuses it. It returns a new float32 array (N, K), K = ``defense.n_classes``, of the
    defense's probability rows (non-negative, each summing to 1), for any N >= 0.

    Errors are the defense's, raised by its input checks exactly as for a torch call:
    ``ValueError`` for a wrong rank or shape, a wrong channel count, an integer dtype (e.g. uint8
    0..255), NaN/inf, or values outside [0, 1]. An input numpy cannot turn into an array of
    numbers (e.g. a ragged list) raises numpy's or torch's ``TypeError``/``ValueError``.
    """
    if not isinstance(defense, Defense):
        raise TypeError(f"expected a cip_helpers.method.defenses.Defense (NoDefense, DP, DAWN, CIP), got "
                        f"{type(defense).__name__}")

    def predict(x: np.ndarray) -> np.ndarray:
        arr = np.asarray(x)
        if np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32, copy=False)
        # contiguous and writable, so torch.from_numpy neither fails nor warns; copies only if needed
        arr = np.require(arr, requirements=["C", "W"])
        answers = defense(torch.from_numpy(arr))
        if isinstance(answers, torch.Tensor):
            answers = answers.detach().cpu().numpy()
        return np.asarray(answers, dtype=np.float32)

    predict.__name__ = f"{defense.name}_numpy_predict"
    predict.__doc__ = f"{type(defense).__name__} as numpy (N, C, H, W) in [0, 1] -> float32 (N, K)."
    return predict


def art_classifier(defense: Defense, **kwargs: Any) -> BlackBoxClassifier:
    """Wrap ``defense`` as an ART ``BlackBoxClassifier`` (``art.estimators.classification``).

    ``input_shape`` = ``defense.input_shape`` (C, H, W), ``nb_classes`` = ``defense.n_classes``
    and ``clip_values`` = (0, 1) come from the defense; ``predict_fn`` is
    :func:`numpy_predict`. ``classifier.predict(x, batch_size=128)`` then takes float arrays
    (N, C, H, W) in [0, 1] and returns float32 (N, K) probability rows, one defense call per
    batch. ``kwargs`` go to ``BlackBoxClassifier`` unchanged (e.g. ``postprocessing_defences``).

    Raises ``ImportError`` naming the install command when ART is not installed, and
    ``TypeError`` if ``kwargs`` tries to set ``predict_fn``, ``input_shape``, ``nb_classes`` or
    ``clip_values`` (the defense fixes them)."""
    fixed = sorted({"predict_fn", "input_shape", "nb_classes", "clip_values"} & set(kwargs))
    if fixed:
        raise TypeError(f"art_classifier sets {', '.join(fixed)} from the defense; do not pass them")
    predict = numpy_predict(defense)  # checks the defense before ART is needed
    try:
        from art.estimators.classification import BlackBoxClassifier
    except ImportError as exc:
        raise ImportError(f"art_classifier needs the Adversarial Robustness Toolbox: "
                          f"{ART_INSTALL_HINT}") from exc
    return BlackBoxClassifier(predict, tuple(defense.input_shape), int(defense.n_classes),
                              clip_values=(0.0, 1.0), **kwargs)
