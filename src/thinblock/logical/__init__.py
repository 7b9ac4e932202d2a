"""thinblock.logical"""
