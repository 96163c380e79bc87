"""The compiled pieces of adreach: the stream engine's JSON decode fast path, its state kernels
and its Redis writer.

Everything else is declared in pyproject.toml. The extensions are optional: where no C
compiler is at hand the install still succeeds, the engine decodes every message with
msgspec (same results, ~2.5x slower decoding; `adreach stream run` says so), sums and
merges its state with NumPy (the same bits, slower) and encodes Redis writes with the
Arrow path (the same bytes, about 1.7x the writer's CPU).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "streams.engine._fastdecode",
            ["streams/engine/_fastdecode.c"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        ),
        Extension(
            "streams.engine._kernels",
            ["streams/engine/_kernels.c"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        ),
        Extension(
            "features._resp",
            ["features/_resp.c"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        ),
    ]
)
