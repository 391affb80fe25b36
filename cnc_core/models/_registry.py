"""String-keyed registry of architectures (timm-style ``@register_model`` / ``create_model``).

Every factory takes ``num_classes``, ``in_chans`` and ``width`` (plus keyword-only extras of its
own) and returns a freshly initialised ``nn.Module`` in train mode. The registry never seeds:
callers seed ``torch`` before :func:`create_model` when they need reproducible weights.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from torch import nn

__all__ = ["ModelInfo", "create_model", "list_models", "model_info", "register_model"]

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

# Arguments every factory must accept; anything else it declares is an architecture extra.
_CORE_ARGS = ("num_classes", "in_chans", "width")


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about an architecture without building it.

    Attributes
    ----------
    name : str
        Registry name, the ``arch`` string users pass.
    family : str
        Architecture family (``"resnet"``, ``"preact_resnet"``, ``"vgg"``, ``"mobilenet_v2"``,
        ``"simple"``).
    input_size : int
        Default square input side: 32 for CIFAR-style stems, 224 for ImageNet stems. Every model
        accepts other sizes (global pooling), this is the size it was designed for.
    default_width : int
        ``width`` used when :func:`create_model` gets ``width=None``; the standard network.
    description : str
        One line: what it is and which checkpoints load into it unchanged.
    extra_kwargs : tuple[str, ...]
        Architecture-specific keyword arguments :func:`create_model` accepts.
    """

    name: str
    family: str
    input_size: int
    default_width: int
    description: str
    extra_kwargs: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Entry:
    factory: ModelFactory
    info: ModelInfo
    accepts_var_kwargs: bool


_REGISTRY: dict[str, _Entry] = {}


def _first_paragraph(doc: str) -> str:
    """The docstring's summary: its lines up to the first blank one, joined."""
    return " ".join(doc.split("\n\n", 1)[0].split())


def _inspect_factory(fn: ModelFactory) -> tuple[tuple[str, ...], bool]:
    """Check the factory's signature; return its extra keyword names and whether it has **kw."""
    params = inspect.signature(fn).parameters
    missing = [a for a in _CORE_ARGS if a not in params]
    if missing:
        raise TypeError(f"model factory {fn.__qualname__} must accept {missing} as arguments")
    extras = tuple(
        name
        for name, p in params.items()
        if name not in _CORE_ARGS
        and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return extras, var_kw


@overload
def register_model(fn: F, /) -> F: ...


@overload
def register_model(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    family: str | None = None,
    input_size: int = 32,
    default_width: int = 64,
    description: str | None = None,
) -> Callable[[F], F]: ...


def register_model(
    fn: F | None = None,
    /,
    *,
    name: str | None = None,
    family: str | None = None,
    input_size: int = 32,
    default_width: int = 64,
    description: str | None = None,
) -> F | Callable[[F], F]:
    """Register a model factory under a name; usable bare or with metadata.

    Parameters
    ----------
    fn : callable, optional
        The factory when used as a bare decorator (``@register_model``).
    name : str, optional
        Registry name; defaults to the function's ``__name__``.
    family : str, optional
        Family; defaults to the last component of the factory's module name.
    input_size : int
        Default input side (32 CIFAR, 224 ImageNet).
    default_width : int
        Width that gives the standard network.
    description : str, optional
        Defaults to the first paragraph of the factory's docstring.

    Returns
    -------
    The factory, unchanged (so it can still be called directly).

    Raises
    ------
    ValueError
        If the name is already registered.
    TypeError
        If the factory does not accept ``num_classes``, ``in_chans`` and ``width``.
    """

    def decorate(factory: F) -> F:
        reg_name = name or factory.__name__
        if reg_name in _REGISTRY:
            raise ValueError(f"model {reg_name!r} is already registered")
        extras, var_kw = _inspect_factory(factory)
        doc = inspect.getdoc(factory) or ""
        info = ModelInfo(
            name=reg_name,
            family=family or factory.__module__.rsplit(".", 1)[-1],
            input_size=input_size,
            default_width=default_width,
            description=description or _first_paragraph(doc) or reg_name,
            extra_kwargs=extras,
        )
        _REGISTRY[reg_name] = _Entry(factory=factory, info=info, accepts_var_kwargs=var_kw)
        return factory

    if fn is not None:
        return decorate(fn)
    return decorate


def list_models(family: str | None = None) -> list[str]:
    """Sorted registry names, optionally only those of one ``family``."""
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.info.family == family)


def _lookup(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_models())
        raise ValueError(f"unknown model architecture {name!r}; known: {known}") from None


def model_info(name: str) -> ModelInfo:
    """Metadata of a registered architecture; ``ValueError`` if the name is unknown."""
    return _lookup(name).info


def _check_positive_int(arg: str, value: object) -> None:
    # bool is an int subclass; width=True is a bug, not 1.
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{arg} must be a positive integer, got {value!r}")


def create_model(
    name: str,
    num_classes: int = 10,
    in_chans: int = 3,
    width: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered architecture, freshly initialised and in train mode.

    Parameters
    ----------
    name : str
        Registry name (see :func:`list_models`).
    num_classes : int
        Number of output logits.
    in_chans : int
        Input channels.
    width : int, optional
        Channel width; ``None`` takes :attr:`ModelInfo.default_width` (the standard network).
        Channel counts scale proportionally with it (see each family's docstring).
    **kwargs
        Architecture extras (:attr:`ModelInfo.extra_kwargs`), e.g. ``dropout``.

    Returns
    -------
    nn.Module
        Maps ``(N, in_chans, H, W)`` float inputs to ``(N, num_classes)`` logits. Weights come
        from the global torch RNG: seed it first for reproducible models.

    Raises
    ------
    ValueError
        Unknown ``name`` (the message lists the known ones), non-positive sizes, or keyword
        arguments the architecture does not take.
    """
    entry = _lookup(name)
    if width is None:
        width = entry.info.default_width
    for arg, value in (("num_classes", num_classes), ("in_chans", in_chans), ("width", width)):
        _check_positive_int(arg, value)
    unknown = sorted(set(kwargs) - set(entry.info.extra_kwargs))
    if unknown and not entry.accepts_var_kwargs:
        accepted = ", ".join(entry.info.extra_kwargs) or "none"
        raise ValueError(
            f"model {name!r} got unexpected keyword argument(s) {unknown}; "
            f"accepted extras: {accepted}"
        )
    return entry.factory(num_classes=num_classes, in_chans=in_chans, width=width, **kwargs)
