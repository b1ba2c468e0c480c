//! Replies too long for one frame travel in parts.
//!
//! A list an agent answers with (the branches of a repository with thousands of them, the
//! route inspector's decisions) can be longer than [`MAX_FRAME_BYTES`]. The agent cuts it into
//! parts that each fit a frame, sized by their encoded bytes, and sends them in order under
//! the job's request id, with `more: true` on every part but the last. The control plane joins
//! the parts of a request ([`ReplyAssembly`]) up to [`MAX_REPLY_BYTES`] in all. Any other
//! answer that would not fit a frame becomes a `failed` reply that says so: no frame over the
//! limit is ever sent.

use serde::Serialize;

use crate::frames::{
    AgentMessage, JobError, JobErrorCode, JobOutput, MAX_FRAME_BYTES, Reply, RequestId, encode,
};
use crate::sizing::{encoded_len, split_escaped};

/// The most the control plane assembles of one reply, all its frames together; past it the
/// reply is refused. It bounds the memory one request can take.
pub const MAX_REPLY_BYTES: usize = 32 << 20;

/// What a reply frame takes besides its output: `{"type":"reply","id":<u64>,"output":…,
/// "more":false}`.
const REPLY_ENVELOPE: usize = 80;

/// The longest message of a failed reply, encoded; longer ones are cut.
const MAX_MESSAGE_BYTES: usize = 16 * 1024;

impl Reply {
    /// A reply in one piece.
    pub fn new(id: RequestId, output: JobOutput) -> Self {
        Self {
            id,
            output,
            more: false,
        }
    }

    /// The frames that carry this reply, each at most [`MAX_FRAME_BYTES`]: one, or for a
    /// list too long for one frame, its parts. An answer that cannot be sent whole (one entry
    /// alone too large for a frame, or all of it over [`MAX_REPLY_BYTES`]) becomes a `failed`
    /// reply saying so.
    pub fn into_frames(self) -> Vec<String> {
        let Reply { id, output, .. } = self;
        if encoded_len(&output) + REPLY_ENVELOPE <= MAX_FRAME_BYTES {
            return vec![reply_frame(id, output, false)];
        }
        match output {
            JobOutput::Branches { branches } => in_parts(id, "branch list", branches, |branches| {
                JobOutput::Branches { branches }
            }),
            JobOutput::Requests { requests } => {
                in_parts(id, "list of requests", requests, |requests| {
                    JobOutput::Requests { requests }
                })
            }
            JobOutput::Woken { services } => {
                in_parts(id, "list of services", services, |services| {
                    JobOutput::Woken { services }
                })
            }
            JobOutput::Failed(JobError { code, message }) => {
                let (kept, _) = split_escaped(&message, MAX_MESSAGE_BYTES);
                let message = kept.to_owned();
                vec![reply_frame(
                    id,
                    JobOutput::Failed(JobError { code, message }),
                    false,
                )]
            }
            // Nothing in these to grow: they always fit.
            output @ (JobOutput::CredentialsAccepted
            | JobOutput::Accepted
            | JobOutput::TornDown
            | JobOutput::RoutesApplied
            | JobOutput::Slept) => vec![reply_frame(id, output, false)],
        }
    }
}

fn reply_frame(id: RequestId, output: JobOutput, more: bool) -> String {
    encode(&AgentMessage::Reply(Reply { id, output, more }))
}

fn failed_frame(id: RequestId, message: String) -> Vec<String> {
    let output = JobOutput::Failed(JobError {
        code: JobErrorCode::Failed,
        message,
    });
    vec![reply_frame(id, output, false)]
}

/// `items` cut into parts that each fit a frame once wrapped by `wrap`.
fn in_parts<T: Serialize>(
    id: RequestId,
    what: &str,
    items: Vec<T>,
    wrap: impl Fn(Vec<T>) -> JobOutput,
) -> Vec<String> {
    let budget = MAX_FRAME_BYTES - REPLY_ENVELOPE - encoded_len(&wrap(Vec::new()));
    let mut parts = Vec::new();
    let mut part = Vec::new();
    let (mut used, mut total) = (0, 0);
    for item in items {
        // Its comma included.
        let bytes = encoded_len(&item) + 1;
        if bytes > budget {
            return failed_frame(
                id,
                format!("one entry of the {what} takes {bytes} bytes, more than a frame holds"),
            );
        }
        total += bytes;
        if total > MAX_REPLY_BYTES {
            return failed_frame(id, too_large(what));
        }
        if used + bytes > budget {
            parts.push(std::mem::take(&mut part));
            used = 0;
        }
        used += bytes;
        part.push(item);
    }
    parts.push(part);
    let last = parts.len() - 1;
    let frames: Vec<String> = parts
        .into_iter()
        .enumerate()
        .map(|(i, part)| reply_frame(id, wrap(part), i < last))
        .collect();
    // Counted as the control plane counts: every frame whole.
    if frames.iter().map(String::len).sum::<usize>() > MAX_REPLY_BYTES {
        return failed_frame(id, too_large(what));
    }
    frames
}

fn too_large(what: &str) -> String {
    format!(
        "the {what} is larger than the {} MiB a reply may hold",
        MAX_REPLY_BYTES >> 20
    )
}

/// Why the parts of a reply were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("its parts add up to more than {MAX_REPLY_BYTES} bytes")]
    TooLarge,
    #[error("its parts are not parts of one list")]
    Mismatch,
}

/// The parts of one reply received so far.
#[derive(Debug, Default)]
pub struct ReplyAssembly {
    output: Option<JobOutput>,
    bytes: usize,
}

impl ReplyAssembly {
    /// Adds the part that came in a frame of `frame_bytes` bytes. Returns the whole reply
    /// once its last part (`more: false`) is in, `None` while parts are still to come.
    pub fn add(
        &mut self,
        reply: Reply,
        frame_bytes: usize,
    ) -> Result<Option<JobOutput>, ReplyError> {
        self.bytes += frame_bytes;
        if self.bytes > MAX_REPLY_BYTES {
            return Err(ReplyError::TooLarge);
        }
        let joined = match (self.output.take(), reply.output) {
            (None, part) => part,
            (
                Some(JobOutput::Branches { mut branches }),
                JobOutput::Branches { branches: next },
            ) => {
                branches.extend(next);
                JobOutput::Branches { branches }
            }
            (
                Some(JobOutput::Requests { mut requests }),
                JobOutput::Requests { requests: next },
            ) => {
                requests.extend(next);
                JobOutput::Requests { requests }
            }
            (Some(JobOutput::Woken { mut services }), JobOutput::Woken { services: next }) => {
                services.extend(next);
                JobOutput::Woken { services }
            }
            (Some(_), _) => return Err(ReplyError::Mismatch),
        };
        if !reply.more {
            return Ok(Some(joined));
        }
        if !matches!(
            joined,
            JobOutput::Branches { .. } | JobOutput::Requests { .. } | JobOutput::Woken { .. }
        ) {
            return Err(ReplyError::Mismatch);
        }
        self.output = Some(joined);
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::{Branch, decode_agent_frame};
    use crate::{BranchName, RouteDecision, RouteKind};

    fn branches(n: usize, name_len: usize) -> Vec<Branch> {
        (0..n)
            .map(|i| Branch {
                name: BranchName::parse(format!("b{i:06}-{}", "x".repeat(name_len))).unwrap(),
                commit: format!("{i:040x}"),
            })
            .collect()
    }

    /// Decodes `frames` as the control plane does, and assembles them.
    fn assemble(frames: &[String]) -> Result<JobOutput, ReplyError> {
        let mut assembly = ReplyAssembly::default();
        for (i, frame) in frames.iter().enumerate() {
            let AgentMessage::Reply(reply) = decode_agent_frame(frame).unwrap() else {
                panic!("not a reply")
            };
            if let Some(output) = assembly.add(reply, frame.len())? {
                assert_eq!(i, frames.len() - 1, "the last part comes last");
                return Ok(output);
            }
        }
        panic!("no last part")
    }

    #[test]
    fn the_envelope_of_a_reply_is_within_its_allowance() {
        let reply = AgentMessage::Reply(Reply::new(RequestId(u64::MAX), JobOutput::Accepted));
        assert!(
            encoded_len(&reply) - encoded_len(&JobOutput::Accepted) <= REPLY_ENVELOPE,
            "{}",
            encode(&reply)
        );
    }

    #[test]
    fn a_short_reply_is_one_frame() {
        let list = branches(3, 10);
        let frames = Reply::new(
            RequestId(1),
            JobOutput::Branches {
                branches: list.clone(),
            },
        )
        .into_frames();
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("\"more\":false"));
        assert_eq!(
            assemble(&frames),
            Ok(JobOutput::Branches { branches: list })
        );
    }

    #[test]
    fn a_branch_list_longer_than_a_frame_arrives_whole_in_parts_that_each_fit() {
        // 20,000 branches with names of ~200 bytes: about 5 MiB.
        let list = branches(20_000, 200);
        let frames = Reply::new(
            RequestId(7),
            JobOutput::Branches {
                branches: list.clone(),
            },
        )
        .into_frames();
        assert!(frames.len() > 4, "{} frames", frames.len());
        for frame in &frames {
            assert!(frame.len() <= MAX_FRAME_BYTES, "{}", frame.len());
        }
        assert_eq!(
            assemble(&frames),
            Ok(JobOutput::Branches { branches: list })
        );
    }

    #[test]
    fn a_list_of_requests_longer_than_a_frame_arrives_whole() {
        let decision = |i: u16| RouteDecision {
            time: time::OffsetDateTime::UNIX_EPOCH,
            method: "GET".into(),
            // Quotes take two bytes each once encoded.
            path: format!("/{i}/{}", "\"".repeat(10_000)),
            service: None,
            route: RouteKind::Baseline,
            upstream: None,
            status: i,
            duration_ms: 1.0,
        };
        let list: Vec<RouteDecision> = (0..200).map(decision).collect();
        let frames = Reply::new(
            RequestId(2),
            JobOutput::Requests {
                requests: list.clone(),
            },
        )
        .into_frames();
        assert!(frames.len() > 1);
        assert!(frames.iter().all(|f| f.len() <= MAX_FRAME_BYTES));
        assert_eq!(
            assemble(&frames),
            Ok(JobOutput::Requests { requests: list })
        );
    }

    #[test]
    fn an_answer_that_cannot_be_sent_whole_becomes_a_failure_that_says_so() {
        // Over the bound of a whole reply.
        let list = branches(130_000, 240);
        let frames = Reply::new(RequestId(3), JobOutput::Branches { branches: list }).into_frames();
        assert_eq!(frames.len(), 1);
        let Ok(JobOutput::Failed(e)) = assemble(&frames) else {
            panic!("{}", frames[0])
        };
        assert!(e.message.contains("32 MiB"), "{}", e.message);

        // A message of control characters is cut to fit.
        let failed = JobOutput::Failed(JobError {
            code: JobErrorCode::Failed,
            message: "\0".repeat(MAX_FRAME_BYTES),
        });
        let frames = Reply::new(RequestId(4), failed).into_frames();
        assert_eq!(frames.len(), 1);
        assert!(frames[0].len() <= MAX_MESSAGE_BYTES + 200);
    }

    #[test]
    fn parts_that_do_not_fit_together_or_grow_too_large_are_refused() {
        let part = |output, more| Reply {
            id: RequestId(1),
            output,
            more,
        };
        let mut assembly = ReplyAssembly::default();
        let first = part(
            JobOutput::Branches {
                branches: branches(1, 1),
            },
            true,
        );
        assert_eq!(assembly.add(first, 100), Ok(None));
        let other = part(
            JobOutput::Requests {
                requests: Vec::new(),
            },
            false,
        );
        assert_eq!(assembly.add(other, 100), Err(ReplyError::Mismatch));

        let mut assembly = ReplyAssembly::default();
        assert_eq!(
            assembly.add(part(JobOutput::Accepted, true), 10),
            Err(ReplyError::Mismatch)
        );

        let mut assembly = ReplyAssembly::default();
        let mut result = Ok(None);
        for _ in 0..=(MAX_REPLY_BYTES / MAX_FRAME_BYTES) {
            result = assembly.add(
                part(
                    JobOutput::Branches {
                        branches: Vec::new(),
                    },
                    true,
                ),
                MAX_FRAME_BYTES,
            );
        }
        assert_eq!(result, Err(ReplyError::TooLarge));
    }
}
