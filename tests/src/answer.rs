//! A worker's gRPC Inference stream read to its end.

use llama_cluster_proto::v1::inference_response::Event;
use llama_cluster_proto::v1::{InferenceRequest, InferenceStats, TokenLogprob};

use crate::NodeProc;

/// What one Inference call streamed.
#[derive(Debug, Default)]
pub struct Answer {
    pub text: String,
    pub tokens: Vec<i32>,
    pub logprobs: Vec<TokenLogprob>,
    pub stats: Option<InferenceStats>,
}

/// Sends `req` to `node` and reads the whole stream.
pub async fn infer(node: &NodeProc, req: InferenceRequest) -> Result<Answer, tonic::Status> {
    let mut client = node
        .client()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut stream = client.inference(req).await?.into_inner();
    let mut a = Answer::default();
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(Event::Chunk(c)) => {
                a.text.push_str(&c.text);
                a.tokens.extend(c.token_ids);
                a.logprobs.extend(c.logprobs);
            }
            Some(Event::Stats(s)) => a.stats = Some(s),
            None => {}
        }
    }
    Ok(a)
}
