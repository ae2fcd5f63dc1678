"""The deployable voxeldose service (FastAPI, job store, Ray workers, DICOM node).

Thin by design: every job ends in :func:`voxeldose.pipeline.run`.  ``voxeldose/`` never imports this
package.  Built in the Service issue; empty until then.
"""
