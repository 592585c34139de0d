"""One renderer for morphable-model faces: rasterisation (:mod:`.raster`) and differentiable
deferred shading, all in torch, batched, on the CPU or CUDA.

- :mod:`.camera`: scaled-orthographic and perspective projection to screen space;
- :mod:`.raster`: the z-buffer (triangle ids; not differentiable, and need not be);
- :mod:`.interpolate`: barycentrics recomputed from the projected vertices (tf_mesh_renderer's
  deferred shading), attribute interpolation (perspective-correct where the camera is);
- :mod:`.shading`: spherical-harmonics Lambertian and Phong shading;
- :mod:`.silhouette`: an analytically antialiased silhouette whose edges carry gradient;
- :mod:`.appearance`: colours sampled from an image at the projected vertices, with visibility;
- :mod:`.renderer`: the composition, ``render``.
"""
