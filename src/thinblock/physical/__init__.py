"""thinblock.physical"""
