"""TensorBoard plugin "gradwatch": gradient-norm heat map, alerts and clipping view.

Importing this package (or `plugin.GradwatchPluginLoader`) does not import
TensorFlow; the plugin reads everything through TensorBoard's data provider.
"""
