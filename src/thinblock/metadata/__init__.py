"""thinblock.metadata"""
