"""thinblock.cache"""
