"""The MLflow "model from code" of a registered APEM version (see ``apem.release.mlflow_registry``).

MLflow stores this file, not a pickled object. Loading runs it, and ``set_model`` names the
model; ``load_context`` then loads the ``model_dir`` artifact with ``apem.inference.model_dir.load_model``
(state_dict with ``weights_only=True``, JSON config, feature state).

Input: a pandas DataFrame with the feature columns of the model's spec (unseen categories map to
the OOV bucket). Output: one column ``p_<label>`` per funnel step, the entire-space probability
P(T_i = 1 | X), recalibrated for the training negative rate.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class ApemServingModel(PythonModel):
    def load_context(self, context):
        from apem.inference.model_dir import load_model

        self.model = load_model(context.artifacts["model_dir"])
        self.model.warm_up()  # e.g. APEM's CPU kernels are built now, within the startup probe, not in a request

    def predict(self, context, model_input, params=None):
        return self.model.predict_frame(model_input)


mlflow.models.set_model(ApemServingModel())
