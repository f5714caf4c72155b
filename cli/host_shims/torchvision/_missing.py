"""Placeholders for the torchvision stand-in: importable, never usable."""


class Missing:
    """Stands for any torchvision object; fails loudly when used."""

    def __init__(self, name):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(
            f"{self._name} is part of the torchvision stand-in (cli/host_shims) that MaskAttn's tools load "
            "when torchvision cannot be imported; "
            "install a torchvision that matches your torch to use it"
        )

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Missing(f"{self._name}.{attr}")

    def __mro_entries__(self, bases):
        # `class Foo(torchvision.something.Base)` at module level still imports.
        return (object,)

    def __repr__(self):
        return f"<torchvision stand-in {self._name}>"


def module_getattr(module_name):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        return Missing(f"{module_name}.{name}")

    return __getattr__
