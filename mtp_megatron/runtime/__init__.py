"""Process groups, devices, seeds, optional accelerator libraries and the CPU bridge."""
