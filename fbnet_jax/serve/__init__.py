"""A trained network outside training: inference, export to other runtimes, predict on images."""
