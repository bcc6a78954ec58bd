"""Training: one trainer loop, stages = dataset + loss."""
