"""Training loops in plain torch (teacher, CD, CT, iCT), checkpoints and network builders; no Ray, no I/O."""
