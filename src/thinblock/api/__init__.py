"""thinblock.api"""
