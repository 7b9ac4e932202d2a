"""thinblock: thin-provisioning block storage in the 3PAR style (zero logical disk), served over NBD."""

__version__ = "0.1.0"
