"""CompBench: a tiny procedural two-object world (world.py) and a programmatic judge (judge.py) for issue 7.

Pure numpy + Pillow; no torch, no ComfyUI. See README.md in this folder.
"""
