"""What a training run leaves behind for people: the metrics of every logged step and a plot of them.

``metrics.MetricsLog`` appends one JSON line per logged step (``read_metrics`` reads them
back); ``plot.plot_runs`` draws one or several runs into a PNG. Neither imports a
training framework, and matplotlib is imported only when a plot is drawn. The file
format is described in docs/data-format.md.
"""
