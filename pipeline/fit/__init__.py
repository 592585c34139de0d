"""The multi-image 3DMM fit (issue 4): batched over subjects, one array-API code path for NumPy and CuPy.

Modules, in the order the loop uses them: ``xp`` (backend selection), ``camera`` (scaled-orthographic
pose), ``linear`` (Jacobians, ridge solves), ``expression``/``identity`` (shape steps), ``joint``
(damped Gauss-Newton step), ``robust`` (Huber/IRLS), ``objective``, ``contour`` (jaw silhouette
correspondence), ``loop`` (the alternation over padded subjects), ``stage`` (landmarks table ->
fits table), ``synthetic`` (landmarks drawn from a model, for tests and benchmarks).
"""
