"""``Model``: a converted network as a pytree of parameters plus a static description.

A ``Model`` is what ``jaxpull.load`` returns. Its parameters are pytree leaves, so a model can
be passed straight into ``jax.jit`` / ``jax.vmap`` / ``jax.grad`` as an ordinary argument: the
parameters are traced, never baked into the compiled function as constants. Everything static
(architecture, number of classes, input normalisation) lives in a hashable ``ModelSpec``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpull.core import checks, models
from jaxpull.core.layers import COMPUTE_DTYPES, IMAGENET_MEAN, IMAGENET_STD, to_model_input
from jaxpull.core.preprocessing import Preprocessing
from jaxpull.core.rules import Rules
from jaxpull.core.settings import VANILLA

Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The static part of a model: what its compiled functions depend on, and its labels.

    ``class_names``, ``preprocessing`` (the image sizes its weights expect) and ``metadata`` do
    not take part in equality or hashing, so two models of the same architecture share compiled
    functions. ``transform_input`` is torchvision's option of GoogLeNet and Inception-v3.
    ``config``: the family builder's size options, as sorted ``(name, value)`` pairs, for models
    built with other sizes than the named architecture's (e.g. a 2-layer ViT in the tests; the
    family's ``torch_config`` reads them off a torch module); empty for the named architectures.
    Checked here against the family's declared options (``Family.check_config``): ValueError
    naming an unknown option or a value of the wrong type.
    """

    arch: str
    num_classes: int = 1000
    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD
    class_names: tuple[str, ...] = dataclasses.field(default=(), compare=False, hash=False)
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False, hash=False)
    transform_input: bool = False
    preprocessing: Preprocessing = dataclasses.field(default=Preprocessing(), compare=False, hash=False)
    config: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        # the builder options checked against the family's declaration, as sorted pairs (lists as tuples)
        object.__setattr__(self, "config", models.get(self.arch).check_config(self.arch, dict(self.config)))
        if self.transform_input and models.get(self.arch).transform_input is None:
            having = ", ".join(a for a, f in models.ARCHITECTURES.items() if f.transform_input is not None)
            raise ValueError(f"{self.arch} has no transform_input option (these have: {having})")

    def module(self) -> nn.Module:
        """The Flax module of this architecture."""
        options = {"transform_input": True} if self.transform_input else {}
        return models.get(self.arch).build(num_classes=self.num_classes, **options, **dict(self.config))


@jax.tree_util.register_pytree_node_class
class Model:
    """A converted classifier: ``model(x) -> logits`` with ``x`` ``(N, H, W, 3)`` in [-1, 1]."""

    def __init__(self, params: Params, spec: ModelSpec):
        self.params = params
        self.spec = spec

    # pytree protocol: parameters are children, the spec is static auxiliary data.
    def tree_flatten(self):
        return (self.params,), self.spec

    @classmethod
    def tree_unflatten(cls, spec, children):
        return cls(children[0], spec)

    @classmethod
    def from_numpy(cls, params: Params, spec: ModelSpec) -> Model:
        """A model whose parameters are device copies of ``params`` (numpy arrays).

        ``jax.device_put``, not ``jnp.asarray``: with jax 0.10 the latter compiles a small
        computation per distinct parameter shape (about 20 ms each on CPU, 2 s for a DenseNet).
        Each array is made C-contiguous first: a transposed view (OIHW -> HWIO) is copied by
        NumPy several times faster than by ``device_put``."""
        put = lambda a: jax.device_put(np.ascontiguousarray(a), may_alias=False)
        return cls(jax.tree_util.tree_map(put, params), spec)

    @property
    def arch(self) -> str:
        return self.spec.arch

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    @property
    def metadata(self) -> Mapping[str, str]:
        return self.spec.metadata

    @property
    def preprocessing(self) -> Preprocessing:
        """The image sizes its weights expect: ``images.load_images(paths, **model.preprocessing.image_options)``."""
        return self.spec.preprocessing

    def apply(self, x: jax.Array, rules: Rules = VANILLA) -> jax.Array:
        """Pure forward pass: ``(N, H, W, 3)`` in [-1, 1] -> logits ``(N, num_classes)``.

        ``rules`` (a :class:`jaxpull.Rules`) change only the backward pass. Call inside ``jax.jit``
        (no input checks).
        """
        x = to_model_input(x, self.spec.input_mean, self.spec.input_std)
        # flax types apply() for its mutable= form as well (output, state): without it, the output alone
        return self.spec.module().apply({"params": self.params}, x, rules)  # type: ignore[return-value]

    @property
    def compute_dtype(self) -> str:
        """The operand dtype of its convolutions and dense layers: their kernels' (``astype``)."""
        kernels = [leaf.dtype for path, leaf in jax.tree_util.tree_leaves_with_path(self.params) if _is_kernel(path)]
        return jnp.dtype(kernels[0] if kernels else jnp.float32).name

    def astype(self, dtype: str) -> Model:
        """The same model computing its convolutions and dense layers with ``dtype`` operands.

        The kernels are cast to ``dtype`` (every layer takes its operands in its kernel's dtype and
        accumulates in float32; biases, norms and gates stay float32, results are float32).
        ``"bfloat16"`` is an opt-in speed/accuracy trade that halves the kernels' memory; the
        array dtypes are part of a compiled function's signature, so it compiles its own functions.
        """
        try:
            name = jnp.dtype(dtype).name
        except TypeError:
            name = str(dtype)
        if name not in COMPUTE_DTYPES:
            raise ValueError(f"unknown compute dtype {dtype!r}: use one of {', '.join(COMPUTE_DTYPES)}")
        cast = lambda path, leaf: leaf.astype(name) if _is_kernel(path) else leaf
        return Model(jax.tree_util.tree_map_with_path(cast, self.params), self.spec)

    def __call__(self, x) -> jax.Array:
        """Logits ``(N, num_classes)`` of images ``x`` ``(N, H, W, 3)`` in [-1, 1] (checked)."""
        x = checks.images(x)
        with self.sized(x.shape):
            return _logits(self, x)

    def require_size(self, height: int, width: int) -> None:
        """ValueError if this architecture cannot run on ``height`` x ``width`` images (a window
        larger than its input somewhere, or a fixed-size model at another size); traced abstractly."""
        x = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
        try:
            jax.eval_shape(lambda p, x: Model(p, self.spec).apply(x), self.params, x)
        except (TypeError, ValueError) as e:
            why = str(e).splitlines()[0] if isinstance(e, ValueError) else "a layer's output would be empty"
            crop = self.preprocessing.crop_size
            raise ValueError(
                f"{self.arch} cannot run on {height}x{width} images ({why}): use larger images such as "
                f"{crop}x{crop}, the size of its weights"
            ) from None

    @contextlib.contextmanager
    def sized(self, shape):
        """Run a computation on images of ``shape`` ``(N, H, W, 3)``: a shape error raised inside it
        becomes :meth:`require_size`'s one-line ValueError when the size is the cause."""
        try:
            yield
        except (TypeError, ValueError):
            self.require_size(int(shape[1]), int(shape[2]))
            raise

    def class_name(self, index: int) -> str:
        """The name of class ``index`` (its index as text if the model has no names)."""
        return self.class_names[index] if self.class_names else str(index)

    def label(self, name_or_index) -> int:
        """The class index of a class name (case-insensitive) or an index; ValueError if neither."""
        return checks.label(name_or_index, self.num_classes, self.class_names)

    def __repr__(self) -> str:
        n = sum(int(p.size) for p in jax.tree_util.tree_leaves(self.params))
        dtype = "" if self.compute_dtype == "float32" else f", compute_dtype={self.compute_dtype!r}"
        return f"Model(arch={self.arch!r}, num_classes={self.num_classes}, parameters={n:,}{dtype})"


def _is_kernel(path) -> bool:
    """Whether a parameter path ends in a convolution's or dense layer's ``kernel``."""
    return getattr(path[-1], "key", None) == "kernel"


@jax.jit
def _logits(model: Model, x: jax.Array) -> jax.Array:
    return model.apply(x)


def param_shapes(spec: ModelSpec, image_size: int = 224) -> Mapping[str, Any]:
    """The parameter tree's shapes for ``spec`` (``jax.ShapeDtypeStruct`` leaves), computed abstractly
    (at the ``image_size`` of ``spec.config`` where it has one: ViT's position embeddings)."""
    module = spec.module()
    image_size = dict(spec.config).get("image_size", image_size)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, VANILLA), x)
    return variables["params"]
