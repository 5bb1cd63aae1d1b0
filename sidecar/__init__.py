"""ion-sidecar: the Sidecar of Ion, rebuilt on Prefect, FastAPI and Hydra.

See ``README.md`` for use and ``DESIGN.md`` (in the shared folder) for the architecture.
"""

__version__ = "0.1.0"
