//! The AWS IoT Jobs profile: the co-signed message is the job document.
//! Pure: topics in, (topic, payload) pairs out; the client task does the IO.
//!
//! The device asks for work with `start-next`, hears of new work on
//! `notify-next`, and reports each job as IN_PROGRESS (with `{step,
//! progress}`; a job waiting for its rollout wave is `step: scheduled`),
//! then SUCCEEDED, FAILED (rolled back, failed) or REJECTED (refused,
//! halted) with a reason. A final
//! report is repeated until AWS accepts it.

use crate::status::UpdateState;
use serde::Deserialize;
use serde_json::{json, Value};

pub type Publish = (String, Vec<u8>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct FinalReport {
    job_id: String,
    status: &'static str,
    details: Value,
}

#[derive(Debug, Default)]
pub struct AwsJobs {
    thing: String,
    /// The job being worked on: its id and the jti of its document.
    current: Option<(String, Option<String>)>,
    /// A final status not yet accepted by AWS.
    unconfirmed: Option<FinalReport>,
    last_in_progress: Option<Value>,
}

/// What a message from AWS means for the device.
#[derive(Debug, PartialEq, Eq)]
pub enum JobsEvent {
    /// A job document to verify and run.
    Document {
        job_id: String,
        document: Vec<u8>,
    },
    /// Replies to send (e.g. the next start-next after a final report).
    Reply(Vec<Publish>),
    Nothing,
}

impl AwsJobs {
    pub fn new(thing: &str) -> Self {
        Self { thing: thing.to_string(), ..Self::default() }
    }

    fn topic(&self, suffix: &str) -> String {
        format!("$aws/things/{}/jobs/{suffix}", self.thing)
    }

    pub fn subscriptions(&self) -> Vec<String> {
        [
            "notify-next",
            "start-next/accepted",
            "start-next/rejected",
            "+/update/accepted",
            "+/update/rejected",
        ]
        .iter()
        .map(|s| self.topic(s))
        .collect()
    }

    /// Whether `topic` belongs to this profile.
    pub fn owns(&self, topic: &str) -> bool {
        topic.starts_with(&self.topic(""))
    }

    fn start_next(&self) -> Publish {
        (self.topic("start-next"), json!({ "clientToken": "fleetd" }).to_string().into_bytes())
    }

    fn update(&self, job_id: &str, status: &str, details: &Value) -> Publish {
        let body = json!({ "status": status, "statusDetails": details, "clientToken": "fleetd" });
        (self.topic(&format!("{job_id}/update")), body.to_string().into_bytes())
    }

    /// On every (re)connect: ask for work, and repeat an unconfirmed final report.
    pub fn on_connect(&self) -> Vec<Publish> {
        let mut out = Vec::new();
        if let Some(r) = &self.unconfirmed {
            out.push(self.update(&r.job_id, r.status, &r.details));
        }
        out.push(self.start_next());
        out
    }

    /// Repeats an unconfirmed final report (called on a timer).
    pub fn retry(&self) -> Vec<Publish> {
        self.unconfirmed.iter().map(|r| self.update(&r.job_id, r.status, &r.details)).collect()
    }

    pub fn on_message(&mut self, topic: &str, payload: &[u8]) -> JobsEvent {
        let Ok(body) = serde_json::from_slice::<Value>(payload) else { return JobsEvent::Nothing };
        let Some(rest) = topic.strip_prefix(&self.topic("")) else { return JobsEvent::Nothing };
        match rest {
            "notify-next" | "start-next/accepted" => {
                let Some(execution) = body.get("execution") else { return JobsEvent::Nothing };
                let job_id = execution.get("jobId").and_then(Value::as_str).unwrap_or_default();
                let Some(document) = execution.get("jobDocument") else { return JobsEvent::Nothing };
                if job_id.is_empty() {
                    return JobsEvent::Nothing;
                }
                if rest == "notify-next" && self.current.as_ref().is_some_and(|(id, _)| id != job_id) {
                    // Busy with another job: it will be asked for when this one ends.
                    return JobsEvent::Nothing;
                }
                let document = document.to_string().into_bytes();
                self.current = Some((job_id.to_string(), crate::trust::peek_jti(&document)));
                JobsEvent::Document { job_id: job_id.to_string(), document }
            }
            _ if rest.ends_with("/update/accepted") => {
                let job_id = rest.trim_end_matches("/update/accepted");
                if self.unconfirmed.as_ref().is_some_and(|r| r.job_id == job_id) {
                    self.unconfirmed = None;
                    self.current = None;
                    self.last_in_progress = None;
                    // This job is over: ask for the next.
                    return JobsEvent::Reply(vec![self.start_next()]);
                }
                JobsEvent::Nothing
            }
            _ => JobsEvent::Nothing,
        }
    }

    /// The worker refused the current job's document.
    pub fn on_refused(&mut self, reason: &str) -> Vec<Publish> {
        let Some((job_id, _)) = self.current.clone() else { return Vec::new() };
        self.finish(&job_id, "REJECTED", json!({ "reason": reason }))
    }

    /// A progress event of the current job (already rate-limited).
    pub fn on_progress(&mut self, step: &str, progress: Option<u64>) -> Vec<Publish> {
        let Some((job_id, _)) = self.current.clone() else { return Vec::new() };
        if self.unconfirmed.is_some() {
            return Vec::new();
        }
        let mut details = json!({ "step": step });
        if let Some(p) = progress {
            details["progress"] = json!(p.to_string());
        }
        self.last_in_progress = Some(details.clone());
        vec![self.update(&job_id, "IN_PROGRESS", &details)]
    }

    /// A status document: the job's end becomes SUCCEEDED or FAILED.
    pub fn on_status(&mut self, doc: &Value) -> Vec<Publish> {
        let Some((job_id, jti)) = self.current.clone() else { return Vec::new() };
        let doc_jti = doc.pointer("/job/jti").and_then(Value::as_str);
        if jti.is_none() || doc_jti != jti.as_deref() || self.unconfirmed.is_some() {
            return Vec::new();
        }
        let reason = doc.get("last_error").and_then(Value::as_str).unwrap_or("").to_string();
        let state = doc.get("state").and_then(Value::as_str);
        // The document's state, typed; `provisioning` and the like are not an update's.
        let update = doc.get("state").and_then(|s| UpdateState::deserialize(s).ok());
        match (update, state) {
            (Some(UpdateState::Committed), _) => {
                self.finish(&job_id, "SUCCEEDED", json!({ "step": UpdateState::Committed }))
            }
            (Some(UpdateState::RolledBack | UpdateState::Failed), _) => {
                self.finish(&job_id, "FAILED", json!({ "reason": reason }))
            }
            // Stopped by a halt before it was installed: the device declines
            // the job, and an abortConfig counting FAILED does not count it.
            (Some(UpdateState::Halted), _) => self.finish(&job_id, "REJECTED", json!({ "reason": reason })),
            (_, Some(step)) if self.last_in_progress.is_none() => self.on_progress(step, None),
            _ => Vec::new(),
        }
    }

    fn finish(&mut self, job_id: &str, status: &'static str, details: Value) -> Vec<Publish> {
        let report = FinalReport { job_id: job_id.to_string(), status, details };
        let publish = self.update(&report.job_id, report.status, &report.details);
        self.unconfirmed = Some(report);
        vec![publish]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn execution(job_id: &str, jti: &str) -> Vec<u8> {
        let claims = json!({"typ": "fleetd.update.v1", "jti": jti});
        let payload = crate::trust::b64url_encode(claims.to_string().as_bytes());
        json!({"execution": {"jobId": job_id, "status": "QUEUED", "versionNumber": 1,
            "jobDocument": {"payload": payload, "signatures": []}}})
        .to_string()
        .into_bytes()
    }

    fn topics(out: &[Publish]) -> Vec<&str> {
        out.iter().map(|(t, _)| t.as_str()).collect()
    }

    fn body(p: &Publish) -> Value {
        serde_json::from_slice(&p.1).unwrap()
    }

    #[test]
    fn a_job_runs_reports_progress_and_its_final_status_is_retried_until_accepted() {
        let mut aws = AwsJobs::new("gw-1");
        assert_eq!(topics(&aws.on_connect()), vec!["$aws/things/gw-1/jobs/start-next"]);
        let event =
            aws.on_message("$aws/things/gw-1/jobs/start-next/accepted", &execution("job-7", "jti-00000007"));
        let JobsEvent::Document { job_id, document } = event else { panic!("{event:?}") };
        assert_eq!(job_id, "job-7");
        assert!(serde_json::from_slice::<Value>(&document).unwrap()["payload"].is_string());

        let out = aws.on_progress("downloading", Some(42));
        assert_eq!(topics(&out), vec!["$aws/things/gw-1/jobs/job-7/update"]);
        assert_eq!(body(&out[0])["status"], "IN_PROGRESS");
        assert_eq!(body(&out[0])["statusDetails"], json!({"step": "downloading", "progress": "42"}));

        // A status for another job changes nothing; ours, committed, succeeds.
        assert!(aws.on_status(&json!({"state": "committed", "job": {"jti": "other-jti-1"}})).is_empty());
        let out = aws.on_status(&json!({"state": "committed", "job": {"jti": "jti-00000007"}}));
        assert_eq!(body(&out[0])["status"], "SUCCEEDED");
        // Not accepted yet: repeated on a timer and on reconnect.
        assert_eq!(body(&aws.retry()[0])["status"], "SUCCEEDED");
        assert_eq!(topics(&aws.on_connect())[0], "$aws/things/gw-1/jobs/job-7/update");
        // Accepted: over, and the next job is asked for.
        let next = aws.on_message("$aws/things/gw-1/jobs/job-7/update/accepted", b"{}");
        assert_eq!(next, JobsEvent::Reply(vec![aws.start_next()]));
        assert!(aws.retry().is_empty());
    }

    #[test]
    fn refusals_and_failures_carry_the_reason() {
        let mut aws = AwsJobs::new("gw-1");
        aws.on_message("$aws/things/gw-1/jobs/notify-next", &execution("job-8", "jti-00000008"));
        let out = aws.on_refused("signature-missing: no signature by required key \"cosigner\"");
        assert_eq!(body(&out[0])["status"], "REJECTED");
        assert!(body(&out[0])["statusDetails"]["reason"].as_str().unwrap().starts_with("signature-missing"));

        let mut aws = AwsJobs::new("gw-1");
        aws.on_message("$aws/things/gw-1/jobs/notify-next", &execution("job-9", "jti-00000009"));
        let out = aws.on_status(
            &json!({"state": "rolled-back", "last_error": "rolled-back: x", "job": {"jti": "jti-00000009"}}),
        );
        assert_eq!(body(&out[0])["status"], "FAILED");
        assert_eq!(body(&out[0])["statusDetails"]["reason"], "rolled-back: x");

        let mut aws = AwsJobs::new("gw-1");
        aws.on_message("$aws/things/gw-1/jobs/notify-next", &execution("job-10", "jti-00000010"));
        let out = aws.on_status(&json!({"state": "scheduled", "job": {"jti": "jti-00000010"}}));
        assert_eq!(
            (body(&out[0])["status"].clone(), body(&out[0])["statusDetails"]["step"].clone()),
            (json!("IN_PROGRESS"), json!("scheduled"))
        );
        let halted = json!({"state": "halted", "last_error": "halted: stopped by halt h-1", "job": {"jti": "jti-00000010"}});
        let out = aws.on_status(&halted);
        assert_eq!(body(&out[0])["status"], "REJECTED");
        assert_eq!(body(&out[0])["statusDetails"]["reason"], "halted: stopped by halt h-1");
    }

    #[test]
    fn hostile_or_empty_messages_do_nothing() {
        let mut aws = AwsJobs::new("gw-1");
        for (topic, payload) in [
            ("$aws/things/gw-1/jobs/notify-next", &b"{}"[..]),
            ("$aws/things/gw-1/jobs/notify-next", b"not json"),
            ("$aws/things/gw-1/jobs/start-next/accepted", br#"{"execution": {"jobId": ""}}"#),
            ("$aws/things/gw-2/jobs/notify-next", br#"{"execution": {"jobId": "x", "jobDocument": {}}}"#),
        ] {
            assert_eq!(aws.on_message(topic, payload), JobsEvent::Nothing, "{topic}");
        }
        assert!(aws.on_refused("x").is_empty());
    }
}
