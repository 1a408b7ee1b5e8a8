import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithKernels(build_py):
    """Copies the ops' sources from the top-level kernels/ folder into the built sgfast.kernels package.

    kernels/ has no __init__.py (a top-level package of that name would shadow the PyPI `kernels` that
    transformers imports); sgfast/kernels/__init__.py reaches the folder in a checkout, a wheel holds
    the files themselves."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install runs from the checkout, where the package's path reaches kernels/
        target = os.path.join(self.build_lib, "sgfast", "kernels")
        for source in sorted(glob.glob(os.path.join("kernels", "*.py"))):
            self.mkpath(target)
            self.copy_file(source, os.path.join(target, os.path.basename(source)))


setup(
    name="sgfast",
    version="0.1.0",
    description="Fast diffusion self-guidance for diffusers Stable Diffusion pipelines",
    python_requires=">=3.10",
    # Our Triton ops live in the top-level kernels/ folder but install as sgfast.kernels (BuildWithKernels).
    packages=["sgfast", "sgfast.serve", "sgfast.shapes", "sgfast.kernels"],
    cmdclass={"build_py": BuildWithKernels},
    include_package_data=True,
    # The built-in model's weights and configs; the server's page.
    package_data={"sgfast.shapes": ["assets/*", "assets/**/*"], "sgfast.serve": ["static/*"]},
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.30,<0.50",
        "transformers>=4.40",
        "triton>=3.0; platform_system=='Linux'",
        "nvidia-ml-py>=12.0",
        "numpy",
        "pillow",
        "tqdm",
        "safetensors",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "scipy"],  # scipy: diffusers' LMS scheduler (parity tests)
        # `make mutate`: mutation testing of the core modules (configured in setup.cfg).
        "mutate": ["mutmut>=3.3"],
        "xformers": ["xformers"],
        # `python -m sgfast serve`: the HTTP server, its metrics, and the load test's client.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "prometheus-client>=0.20"],
        # `python -m sgfast serve-ray`: the same API on Ray Serve, one replica per GPU.
        "ray": ["ray[serve]>=2.9", "fastapi>=0.110", "httpx>=0.27", "prometheus-client>=0.20"],
        # The web page's test drives Debian's chromium (installed by the system, not by pip).
        "browser": ["playwright>=1.40"],
        # `make docs`: the documentation site (MkDocs + Material; the API reference from the docstrings).
        "docs": ["mkdocs>=1.6", "mkdocs-material>=9", "mkdocstrings[python]>=0.25"],
    },
)
