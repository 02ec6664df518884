"""The training loop and what it calls: step, losses, optimizer, logging."""
