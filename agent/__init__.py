"""edge-agent: the device-side daemon (control channel, deployer, bundle store, status)."""

__version__ = "0.1.0"
