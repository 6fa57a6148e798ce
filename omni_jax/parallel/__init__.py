"""Device meshes and logical-axis -> mesh-axis rules."""
