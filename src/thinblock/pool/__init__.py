"""thinblock.pool"""
