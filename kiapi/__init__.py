"""kiapi: a local inference server whose contract is the OpenAPI documents in ``specs/``."""

__version__ = "0.1.0"
