"""Training: data, networks, losses and the loop that writes a checkpoint folder."""
