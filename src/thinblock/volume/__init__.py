"""thinblock.volume"""
