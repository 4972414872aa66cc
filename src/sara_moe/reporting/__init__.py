"""Arms side by side: accuracy with paired tests, routing beside accuracy, the maps of each arm, the
training monitor's curves, and all of it as one interactive report.html.

- `report`: `sara report`, the table and its paired tests per language.
- `routing_panels`: routing similarity against accuracy, routing curves, each arm's maps.
- `monitor_curves`: the routing monitor's series from each run's trainer_state.json, as PNGs.
- `html_report`: report.html, the same report as one self-contained interactive page (plotly inlined).
- `neuron_panels`: `--neurons`, the `sara neurons --compare` numbers as tables, sentences and a plot.

May import `evaluation`, `analysis` and everything below them; never `testbed` or `experiment`.
"""
