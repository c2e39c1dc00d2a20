"""What a training run leaves behind for people: the metrics of every logged step and a plot of them."""
