"""Placeholder factory for the test-only torchvision shim (see ``torchvision/__init__.py``)."""


def placeholder(name: str) -> type:
    def _fail(*args, **kwargs):
        raise RuntimeError(f"torchvision.{name} is a test-only placeholder (tests/shims/torchvision)")

    return type(name, (), {"__init__": _fail, "__call__": _fail})


def module_getattr(module: str):
    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return placeholder(f"{module}.{attr}")

    return __getattr__
