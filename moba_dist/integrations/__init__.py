"""Framework integrations (``moba_dist.integrations.hf``, ...), each imported explicitly so that
``import moba_dist`` never imports the frameworks they need."""

__all__ = []
