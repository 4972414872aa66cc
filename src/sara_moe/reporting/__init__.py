"""Arms side by side: accuracy with paired tests, routing beside accuracy, the maps of each arm.

- `report`: `sara report`, the table and its paired tests per language.
- `routing_panels`: routing similarity against accuracy, routing curves, each arm's maps.

May import `evaluation`, `analysis` and everything below them; never `testbed` or `experiment`.
"""
