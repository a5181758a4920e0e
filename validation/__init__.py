"""The validation room: is the planner right? Runs plans on the engine and compares what happened with what the
planner predicted and the simulator simulated.

``compare`` (the prediction for a measured run, predicted-vs-measured reports and signed errors), ``runs`` (run a
plan file on its model and write the result files), ``grid`` (the validate grid and its summary), ``show`` (the
tables ``specplan run`` and ``specplan validate`` print), ``demo`` (the demo's steps), ``figures`` (a profile's
bandwidth, matmul and roofline plot). It may import the planner, the simulator and the engine; no room imports it.
"""
