"""The networks of the network annotators, each with key names equal to its original weight file."""
