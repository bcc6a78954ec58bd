"""Command-line front ends of the engine: `minimind generate` and `minimind chat`, with their shared flags."""
