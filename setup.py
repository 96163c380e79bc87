"""The one compiled piece of adreach: the stream engine's JSON decode fast path.

Everything else is declared in pyproject.toml. The extension is optional: where no C
compiler is at hand the install still succeeds and the engine decodes every message
with msgspec (same results, ~2.5x slower decoding; `adreach stream run` says so).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "streams.engine._fastdecode",
            ["streams/engine/_fastdecode.c"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        )
    ]
)
