"""thinblock.nbd"""
