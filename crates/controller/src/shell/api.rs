//! The controller's REST API (axum), versioned under `/v1`, JSON both ways.
//!
//! * Every error is an [`ErrorBody`] with the status of [`ApiError::status`]; a body that is not
//!   JSON, has a field of the wrong type or an unknown field is a 400 whose `detail` names the
//!   problem (serde's message, with line and column).
//! * A controller that does not lead answers every `/v1` call with 503 and
//!   `{"error": "not the leader", "detail": "... the leader is at URL"}` (no proxying: clients
//!   retry at the leader's URL; `tern cluster` does so once by itself).
//! * A change is answered only after its desired state is stored in etcd; if the store fails the
//!   answer is 503 (`not stored`), this controller steps down, and the next leader starts from
//!   what etcd holds, so nothing is half-created.
//! * `GET /openapi.json` is the OpenAPI 3 document generated (utoipa) from the `tern-api` types and
//!   the handlers below; `GET /metrics` is Prometheus text.

// Handlers answer errors as ready `Response`s (axum's idiom); their size does not matter here.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tern_api::agent::AgentReport;
use tern_api::automation::{
    ActionStatus, AutomationLevel, AutomationRound, AutomationRounds, DetectorKind, HostPower,
    MigrationActual, MigrationPrediction, Plan, PlanAction, PlanEffect, PlanState, Policy,
    PowerPolicy, PredictedOutcome, RoundPoint, SelectionKind, SeriesPoint, StatsSeries,
};
use tern_api::cluster::{
    ErrorBody, EventInfo, HostCapacity, HostInfo, HostState, MaintenanceRequest, MigrateRequest,
    TaskDetail, TaskInfo, TaskKind, TaskPhases, TaskRef, TaskState, VmCreate, VmInfo, VmState,
    validate_name,
};
use tern_automation::PlanError;
use utoipa::OpenApi;

use super::{ApiFailure, Shared};
use crate::core::{ApiError, Input};

/// The OpenAPI document of the controller's API.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "Tern controller API",
        description = "The cluster controller's REST API: hosts, VMs, migrations, maintenance, \
            tasks and events, and the automation loop (policy, plans, series). A controller that \
            does not lead answers 503 naming the leader's URL."
    ),
    paths(
        list_hosts,
        get_host,
        set_maintenance,
        list_vms,
        create_vm,
        get_vm,
        delete_vm,
        migrate_vm,
        list_tasks,
        get_task,
        list_events,
        agent_report,
        get_policy,
        put_policy,
        list_plans,
        get_plan,
        apply_plan,
        reject_plan,
        stats_series,
        automation_rounds
    ),
    components(schemas(
        ErrorBody,
        HostInfo,
        HostCapacity,
        HostState,
        MaintenanceRequest,
        VmCreate,
        VmInfo,
        VmState,
        MigrateRequest,
        TaskRef,
        TaskInfo,
        TaskPhases,
        TaskKind,
        TaskState,
        EventInfo,
        AgentReport,
        TaskDetail,
        Policy,
        PowerPolicy,
        AutomationLevel,
        DetectorKind,
        SelectionKind,
        Plan,
        PlanState,
        PlanAction,
        ActionStatus,
        MigrationPrediction,
        MigrationActual,
        PlanEffect,
        PredictedOutcome,
        HostPower,
        StatsSeries,
        SeriesPoint,
        AutomationRounds,
        AutomationRound,
        RoundPoint
    ))
)]
pub struct ApiDoc;

/// The router: `/v1/...`, `/openapi.json`, `/metrics`.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{name}", get(get_host))
        .route("/v1/hosts/{name}/maintenance", post(set_maintenance))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{name}/migrate", post(migrate_vm))
        .route("/v1/tasks", get(list_tasks))
        .route("/v1/tasks/{id}", get(get_task))
        .route("/v1/events", get(list_events))
        .route("/v1/agent/reports", post(agent_report))
        .route("/v1/policy", get(get_policy).merge(put(put_policy)))
        .route("/v1/plans", get(list_plans))
        .route("/v1/plans/{id}", get(get_plan))
        .route("/v1/plans/{id}/apply", post(apply_plan))
        .route("/v1/plans/{id}/reject", post(reject_plan))
        .route("/v1/stats/series", get(stats_series))
        .route("/v1/automation/rounds", get(automation_rounds))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .merge(super::dashboard::router())
        .fallback(not_found)
        .with_state(shared)
}

type S = State<Arc<Shared>>;
type Reply = Result<Response, Response>;

fn error(status: u16, error: &str, detail: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = ErrorBody {
        error: error.into(),
        detail,
    };
    (status, axum::Json(body)).into_response()
}

fn not_leader(s: &Shared) -> Response {
    let detail = match s.leader_url() {
        Some(url) => format!(
            "this controller ({}) does not lead; the leader is at {url}",
            s.url()
        ),
        None => format!(
            "this controller ({}) does not lead, and no leader is elected right now; retry shortly",
            s.url()
        ),
    };
    error(503, ApiError::NotLeader.kind(), detail)
}

fn api_error(s: &Shared, e: ApiError) -> Response {
    if e == ApiError::NotLeader {
        return not_leader(s);
    }
    error(e.status(), e.kind(), e.to_string())
}

fn failure(s: &Shared, f: ApiFailure) -> Response {
    match f {
        ApiFailure::Core(e) => api_error(s, e),
        ApiFailure::NotStored(_) => error(503, "not stored", f.to_string()),
    }
}

fn leading(s: &Shared) -> Result<(), Response> {
    if s.core().generation().is_none() {
        return Err(not_leader(s));
    }
    Ok(())
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    (status, axum::Json(value)).into_response()
}

/// Decodes a JSON body strictly; any problem is a 400 naming it.
fn body<T: DeserializeOwned>(bytes: &Bytes, what: &str) -> Result<T, Response> {
    serde_json::from_slice(bytes).map_err(|e| {
        error(
            400,
            "bad JSON",
            format!("the body is not a valid {what}: {e}"),
        )
    })
}

fn name(what: &'static str, n: &str) -> Result<(), Response> {
    validate_name(what, n).map_err(|e| error(400, "invalid input", e.to_string()))
}

#[utoipa::path(get, path = "/v1/hosts", tag = "hosts",
    responses((status = 200, description = "Every host", body = [HostInfo]),
              (status = 503, description = "Not the leader", body = ErrorBody)))]
async fn list_hosts(State(s): S) -> Reply {
    leading(&s)?;
    let hosts = s.core().hosts(); // one lock at a time
    Ok(json(StatusCode::OK, &s.automation().with_power(hosts)))
}

#[utoipa::path(get, path = "/v1/hosts/{name}", tag = "hosts",
    params(("name" = String, Path, description = "The host's name")),
    responses((status = 200, body = HostInfo),
              (status = 400, description = "Invalid name", body = ErrorBody),
              (status = 404, description = "Unknown host", body = ErrorBody),
              (status = 503, description = "Not the leader", body = ErrorBody)))]
async fn get_host(State(s): S, Path(host): Path<String>) -> Reply {
    name("host", &host)?;
    leading(&s)?;
    let found = s.core().host(&host); // the lock ends here: api_error may take it
    let h = found.map_err(|e| api_error(&s, e))?;
    let h = s.automation().with_power(vec![h]).remove(0);
    Ok(json(StatusCode::OK, &h))
}

#[utoipa::path(post, path = "/v1/hosts/{name}/maintenance", tag = "hosts",
    params(("name" = String, Path, description = "The host's name")),
    request_body = MaintenanceRequest,
    responses((status = 202, description = "Entering: the task moving its VMs away", body = TaskRef),
              (status = 200, description = "Left maintenance (or no change): the host", body = HostInfo),
              (status = 400, description = "Bad JSON or name", body = ErrorBody),
              (status = 404, description = "Unknown host", body = ErrorBody),
              (status = 503, description = "Not the leader, not ready (a new leader gathering every host's report), or not stored", body = ErrorBody)))]
async fn set_maintenance(State(s): S, Path(host): Path<String>, bytes: Bytes) -> Reply {
    name("host", &host)?;
    let req: MaintenanceRequest = body(&bytes, "maintenance request ({\"enter\": true|false})")?;
    leading(&s)?;
    let task = s
        .api(|c, now| c.set_maintenance(&host, req.enter, now))
        .await
        .map_err(|f| failure(&s, f))?;
    match task {
        Some(t) => Ok(json(StatusCode::ACCEPTED, &t)),
        None => {
            let found = s.core().host(&host); // the lock ends here: api_error may take it
            let h = found.map_err(|e| api_error(&s, e))?;
            Ok(json(StatusCode::OK, &h))
        }
    }
}

#[utoipa::path(get, path = "/v1/vms", tag = "vms",
    responses((status = 200, description = "Every VM", body = [VmInfo]),
              (status = 503, description = "Not the leader", body = ErrorBody)))]
async fn list_vms(State(s): S) -> Reply {
    leading(&s)?;
    Ok(json(StatusCode::OK, &s.core().vms()))
}

#[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = VmCreate,
    responses((status = 201, description = "Created and placed", body = VmInfo),
              (status = 400, description = "Bad JSON, invalid name, size out of range", body = ErrorBody),
              (status = 404, description = "The pinned host is unknown", body = ErrorBody),
              (status = 409, description = "The name is taken, no host fits, or the pinned host is off or being powered off by the automation", body = ErrorBody),
              (status = 503, description = "Not the leader, not ready (a new leader gathering every host's report), or not stored", body = ErrorBody)))]
async fn create_vm(State(s): S, bytes: Bytes) -> Reply {
    let spec: VmCreate = body(&bytes, "VM (VmCreate)")?;
    leading(&s)?;
    let vm = s
        .api(|c, now| c.create_vm(spec, now))
        .await
        .map_err(|f| failure(&s, f))?;
    Ok(json(StatusCode::CREATED, &vm))
}

#[utoipa::path(get, path = "/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "The VM's name")),
    responses((status = 200, body = VmInfo),
              (status = 400, description = "Invalid name", body = ErrorBody),
              (status = 404, description = "Unknown VM", body = ErrorBody),
              (status = 503, description = "Not the leader", body = ErrorBody)))]
async fn get_vm(State(s): S, Path(vm): Path<String>) -> Reply {
    name("VM", &vm)?;
    leading(&s)?;
    let found = s.core().vm(&vm);
    let v = found.map_err(|e| api_error(&s, e))?;
    Ok(json(StatusCode::OK, &v))
}

#[utoipa::path(delete, path = "/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "The VM's name")),
    responses((status = 204, description = "Deleted (its host is told to stop it)"),
              (status = 400, description = "Invalid name", body = ErrorBody),
              (status = 404, description = "Unknown VM", body = ErrorBody),
              (status = 409, description = "It is migrating", body = ErrorBody),
              (status = 503, description = "Not the leader, not ready (a new leader gathering every host's report), or not stored", body = ErrorBody)))]
async fn delete_vm(State(s): S, Path(vm): Path<String>) -> Reply {
    name("VM", &vm)?;
    leading(&s)?;
    s.api(|c, now| c.delete_vm(&vm, now))
        .await
        .map_err(|f| failure(&s, f))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/v1/vms/{name}/migrate", tag = "vms",
    params(("name" = String, Path, description = "The VM's name")),
    request_body = MigrateRequest,
    responses((status = 202, description = "The migration task", body = TaskRef),
              (status = 400, description = "Bad JSON, a bad name, or post_copy_after outside 1..=1000", body = ErrorBody),
              (status = 404, description = "Unknown VM or host", body = ErrorBody),
              (status = 409, description = "Not running, already moving, no host fits, or the target is off or being powered off by the automation", body = ErrorBody),
              (status = 503, description = "Not the leader", body = ErrorBody)))]
async fn migrate_vm(State(s): S, Path(vm): Path<String>, bytes: Bytes) -> Reply {
    name("VM", &vm)?;
    let req: MigrateRequest = if bytes.is_empty() {
        MigrateRequest::default()
    } else {
        body(
            &bytes,
            "migrate request ({\"to\": HOST or null, \"post_copy_after\": 1..=1000, optional})",
        )?
    };
    if let Some(to) = &req.to {
        name("host", to)?;
    }
    req.validate()
        .map_err(|e| error(400, "invalid input", e.to_string()))?;
    leading(&s)?;
    let task = s
        .api(|c, now| c.migrate_vm_with(&vm, req.to.as_deref(), req.post_copy_after, now))
        .await
        .map_err(|f| failure(&s, f))?;
    Ok(json(StatusCode::ACCEPTED, &task))
}

#[utoipa::path(get, path = "/v1/tasks", tag = "tasks",
    params(("active" = Option<bool>, Query, description = "Only queued and running tasks")),
    responses((status = 200, description = "Tasks, oldest first (migrations with their predicted and measured cost)", body = [TaskDetail]),
              (status = 400, description = "Bad query", body = ErrorBody),
              (status = 503, description = "Not the leader", body = ErrorBody)))]
async fn list_tasks(State(s): S, RawQuery(q): RawQuery) -> Reply {
    let mut active = false;
    for pair in q
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        active = match pair {
            "active=true" => true,
            "active=false" => false,
            _ => {
                return Err(error(
                    400,
                    "invalid input",
                    format!("unknown query parameter {pair:?}: only active=true|false is allowed"),
                ));
            }
        };
    }
    leading(&s)?;
    let tasks = s.core().tasks(active); // the core's lock ends here, before the loop's
    let a = s.automation();
    let tasks: Vec<TaskDetail> = tasks.into_iter().map(|t| a.detail(t)).collect();
    Ok(json(StatusCode::OK, &tasks))
}

#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks",
    params(("id" = u64, Path, description = "The task's id")),
    responses((status = 200, description = "The task (a migration with its predicted and measured cost)", body = TaskDetail),
              (status = 400, description = "Not a number", body = ErrorBody),
              (status = 404, description = "Unknown task", body = ErrorBody),
              (status = 503, description = "Not the leader", body = ErrorBody)))]
async fn get_task(State(s): S, Path(id): Path<String>) -> Reply {
    let id: u64 = id.parse().map_err(|_| {
        error(
            400,
            "invalid input",
            format!("task id {id:?} is not a number (0..={})", u64::MAX),
        )
    })?;
    leading(&s)?;
    let found = s.core().task(id);
    let t = found.map_err(|e| api_error(&s, e))?;
    let t = s.automation().detail(t);
    Ok(json(StatusCode::OK, &t))
}

#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(("since" = Option<u64>, Query, description = "Only events with a higher sequence number")),
    responses((status = 200, description = "Events, oldest first", body = [EventInfo]),
              (status = 400, description = "Bad query", body = ErrorBody),
              (status = 503, description = "Not the leader", body = ErrorBody)))]
async fn list_events(State(s): S, RawQuery(q): RawQuery) -> Reply {
    let mut since = 0;
    for pair in q
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("since", v)) => {
                since = v.parse().map_err(|_| {
                    error(400, "invalid input", format!("since={v:?} is not a number"))
                })?
            }
            _ => {
                return Err(error(
                    400,
                    "invalid input",
                    format!("unknown query parameter {pair:?}: only since=N is allowed"),
                ));
            }
        }
    }
    leading(&s)?;
    Ok(json(StatusCode::OK, &s.core().events(since)))
}

#[utoipa::path(post, path = "/v1/agent/reports", tag = "agents", request_body = AgentReport,
    responses((status = 204, description = "Taken"),
              (status = 400, description = "Bad JSON", body = ErrorBody),
              (status = 403, description = "Over TLS: not a host certificate, or another host's report", body = ErrorBody),
              (status = 503, description = "Not the leader", body = ErrorBody)))]
async fn agent_report(
    State(s): S,
    caller: Option<axum::Extension<super::auth::Caller>>,
    bytes: Bytes,
) -> Reply {
    let report: AgentReport = body(&bytes, "agent report")?;
    // Over TLS a host reports only for itself: the name comes from its certificate.
    if let Some(axum::Extension(super::auth::Caller::Host(name))) = &caller
        && *name != report.host
    {
        return Err(error(
            403,
            "forbidden",
            format!(
                "host certificate {name:?} may report only for host {name:?}, not {:?}",
                report.host
            ),
        ));
    }
    leading(&s)?;
    super::automation::note_report(&s, &report);
    s.feed(Input::Report(report)).await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/v1/policy", tag = "automation",
    responses((status = 200, description = "The automation policy in force", body = Policy),
              (status = 503, description = "Not the leader", body = ErrorBody)))]
async fn get_policy(State(s): S) -> Reply {
    leading(&s)?;
    let p = s.automation().policy().clone();
    Ok(json(StatusCode::OK, &p))
}

#[utoipa::path(put, path = "/v1/policy", tag = "automation", request_body = Policy,
    responses((status = 200, description = "Stored and in force", body = Policy),
              (status = 400, description = "Bad JSON, a missing or unknown field, or a value out of its range (named); nothing changed", body = ErrorBody),
              (status = 503, description = "Not the leader, or not stored", body = ErrorBody)))]
async fn put_policy(State(s): S, bytes: Bytes) -> Reply {
    use super::automation::SetPolicyError;
    let policy: Policy = body(&bytes, "automation policy (every field)")?;
    leading(&s)?;
    match super::automation::set_policy(&s, policy).await {
        Ok(p) => Ok(json(StatusCode::OK, &p)),
        Err(SetPolicyError::Invalid(e)) => Err(error(400, "invalid input", e.to_string())),
        Err(SetPolicyError::NotLeader) => Err(not_leader(&s)),
        Err(e @ SetPolicyError::NotStored(_)) => Err(error(503, "not stored", e.to_string())),
    }
}

#[utoipa::path(get, path = "/v1/plans", tag = "automation",
    responses((status = 200, description = "Plans kept, newest first", body = [Plan]),
              (status = 503, description = "Not the leader", body = ErrorBody)))]
async fn list_plans(State(s): S) -> Reply {
    leading(&s)?;
    let plans = s.automation().plans();
    Ok(json(StatusCode::OK, &plans))
}

fn plan_id(id: &str) -> Result<u64, Response> {
    id.parse().map_err(|_| {
        error(
            400,
            "invalid input",
            format!("plan id {id:?} is not a number (0..={})", u64::MAX),
        )
    })
}

fn plan_error(e: PlanError) -> Response {
    match e {
        PlanError::Unknown(_) => error(404, "unknown plan", e.to_string()),
        PlanError::NotProposed { .. } | PlanError::Superseded { .. } | PlanError::Busy { .. } => {
            error(409, "conflict", e.to_string())
        }
    }
}

#[utoipa::path(get, path = "/v1/plans/{id}", tag = "automation",
    params(("id" = u64, Path, description = "The plan's id")),
    responses((status = 200, body = Plan),
              (status = 400, description = "Not a number", body = ErrorBody),
              (status = 404, description = "Unknown plan", body = ErrorBody),
              (status = 503, description = "Not the leader", body = ErrorBody)))]
async fn get_plan(State(s): S, Path(id): Path<String>) -> Reply {
    let id = plan_id(&id)?;
    leading(&s)?;
    let plan = s.automation().plan(id);
    let plan = plan.ok_or_else(|| plan_error(PlanError::Unknown(id)))?;
    Ok(json(StatusCode::OK, &plan))
}

#[utoipa::path(post, path = "/v1/plans/{id}/apply", tag = "automation",
    params(("id" = u64, Path, description = "The plan's id")),
    responses((status = 202, description = "Being applied: its migrations are tasks now", body = Plan),
              (status = 400, description = "Not a number", body = ErrorBody),
              (status = 404, description = "Unknown plan", body = ErrorBody),
              (status = 409, description = "Not proposed (applied, rejected, superseded, failed, vetoed), superseded now (the cluster changed since it was computed), or another plan is being applied", body = ErrorBody),
              (status = 503, description = "Not the leader, or not ready", body = ErrorBody)))]
async fn apply_plan(State(s): S, Path(id): Path<String>) -> Reply {
    let id = plan_id(&id)?;
    leading(&s)?;
    let ready = s.core().ready(); // the lock ends here: api_error may take it
    if !ready {
        return Err(api_error(&s, ApiError::NotReady));
    }
    let plan = super::automation::apply(&s, id).await.map_err(plan_error)?;
    Ok(json(StatusCode::ACCEPTED, &plan))
}

#[utoipa::path(post, path = "/v1/plans/{id}/reject", tag = "automation",
    params(("id" = u64, Path, description = "The plan's id")),
    responses((status = 200, description = "Rejected", body = Plan),
              (status = 400, description = "Not a number", body = ErrorBody),
              (status = 404, description = "Unknown plan", body = ErrorBody),
              (status = 409, description = "Not proposed", body = ErrorBody),
              (status = 503, description = "Not the leader", body = ErrorBody)))]
async fn reject_plan(State(s): S, Path(id): Path<String>) -> Reply {
    let id = plan_id(&id)?;
    leading(&s)?;
    let plan = super::automation::reject(&s, id)
        .await
        .map_err(plan_error)?;
    Ok(json(StatusCode::OK, &plan))
}

#[utoipa::path(get, path = "/v1/stats/series", tag = "automation",
    responses((status = 200, description = "One point per loop round, oldest first", body = StatsSeries),
              (status = 503, description = "Not the leader", body = ErrorBody)))]
async fn stats_series(State(s): S) -> Reply {
    leading(&s)?;
    let series = s.automation().series();
    Ok(json(StatusCode::OK, &series))
}

#[utoipa::path(get, path = "/v1/automation/rounds", tag = "automation",
    responses((status = 200, description = "The loop's most recent rounds since this controller took office (at most 256), oldest first: when each ran and the load it decided on", body = AutomationRounds),
              (status = 503, description = "Not the leader", body = ErrorBody)))]
async fn automation_rounds(State(s): S) -> Reply {
    leading(&s)?;
    let now = s.now_ms();
    let rounds = s.automation().rounds(now);
    Ok(json(StatusCode::OK, &rounds))
}

async fn openapi() -> Response {
    json(StatusCode::OK, &ApiDoc::openapi())
}

async fn not_found() -> Response {
    error(
        404,
        "not found",
        "no such endpoint: see /openapi.json for the API".into(),
    )
}

/// Upper bounds of the migration-duration histogram, seconds.
const BUCKETS: [f64; 8] = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0];

async fn metrics(State(s): S) -> Response {
    let text = render_metrics(&s);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
        .into_response()
}

/// The Prometheus text of `/metrics`.
pub fn render_metrics(s: &Shared) -> String {
    use std::fmt::Write;
    let core = s.core();
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(o, "{name}{labels} {v}");
        }
    };
    let gen_ = core.generation();
    metric(
        "tern_controller_leader",
        "gauge",
        "1 while this controller leads.",
        &[(String::new(), f64::from(u8::from(gen_.is_some())))],
    );
    metric(
        "tern_controller_generation",
        "gauge",
        "The generation (leader key revision) this controller leads with; 0 when it does not.",
        &[(String::new(), gen_.unwrap_or(0) as f64)],
    );
    let hosts = core.hosts();
    let states = [
        (HostState::Up, "up"),
        (HostState::Lost, "lost"),
        (HostState::Fenced, "fenced"),
    ];
    let samples: Vec<(String, f64)> = states
        .iter()
        .map(|(st, l)| {
            let n = hosts.iter().filter(|h| h.state == *st).count();
            (format!("{{state=\"{l}\"}}"), n as f64)
        })
        .collect();
    metric("tern_hosts", "gauge", "Hosts by state.", &samples);
    let vms = core.vms();
    let vstates = [
        (VmState::Pending, "pending"),
        (VmState::Starting, "starting"),
        (VmState::Running, "running"),
        (VmState::Migrating, "migrating"),
        (VmState::Stopped, "stopped"),
        (VmState::Failed, "failed"),
    ];
    let samples: Vec<(String, f64)> = vstates
        .iter()
        .map(|(st, l)| {
            let n = vms.iter().filter(|v| v.state == *st).count();
            (format!("{{state=\"{l}\"}}"), n as f64)
        })
        .collect();
    metric("tern_vms", "gauge", "VMs by state.", &samples);
    let c = core.counters;
    metric(
        "tern_migrations_total",
        "counter",
        "Live migrations that ended, by result.",
        &[
            (
                "{result=\"succeeded\"}".into(),
                c.migrations_succeeded as f64,
            ),
            ("{result=\"failed\"}".into(), c.migrations_failed as f64),
        ],
    );
    // Task ids run from 1 without gaps, and tasks are kept.
    let durations: Vec<f64> = (1..)
        .map_while(|id| core.task(id).ok())
        .filter(|t| t.kind == TaskKind::Migrate && t.state == TaskState::Succeeded)
        .filter_map(|t| Some(t.finished_ms?.saturating_sub(t.created_ms) as f64 / 1000.0))
        .collect();
    let mut samples: Vec<(String, f64)> = BUCKETS
        .iter()
        .map(|b| {
            let n = durations.iter().filter(|d| **d <= *b).count();
            (format!("_bucket{{le=\"{b}\"}}"), n as f64)
        })
        .collect();
    samples.push(("_bucket{le=\"+Inf\"}".into(), durations.len() as f64));
    // Summed from +0.0: an empty f64 sum is -0.0, which Prometheus text would show as "-0".
    samples.push(("_sum".into(), durations.iter().fold(0.0, |a, d| a + d)));
    samples.push(("_count".into(), durations.len() as f64));
    let _ = writeln!(
        o,
        "# HELP tern_migration_duration_seconds Succeeded live migrations, request to completion.\n\
         # TYPE tern_migration_duration_seconds histogram"
    );
    for (suffix, v) in samples {
        let _ = writeln!(o, "tern_migration_duration_seconds{suffix} {v}");
    }
    let mut metric = |name: &str, help: &str, v: u64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    };
    metric(
        "tern_ha_restarts_total",
        "VMs restarted elsewhere after their host was lost.",
        c.ha_restarts,
    );
    metric(
        "tern_hosts_fenced_total",
        "Lost hosts whose disk write leases were fenced.",
        c.hosts_fenced,
    );
    metric(
        "tern_controller_elections_won_total",
        "Times this controller took office.",
        c.elections_won,
    );
    metric(
        "tern_controller_leader_changes_total",
        "Times the leader key changed hands, as this controller saw it.",
        s.leader_changes(),
    );
    let (predicted_n, predicted_err) = s.automation().prediction_error(&core.tasks(false));
    let (active, overloaded) = s.automation().sla_counts();
    let (overhead, overhead_n) = s.automation().overhead();
    let vm_cpu: Vec<(String, f64)> = s
        .automation()
        .vm_utilization()
        .iter()
        .map(|(vm, u)| (format!("{{vm=\"{vm}\"}}"), *u))
        .collect();
    let a = s.automation().counters(); // after the core's lock, as everywhere
    for (state, n) in [
        ("proposed", a.proposed),
        ("applied", a.applied),
        ("superseded", a.superseded),
        ("vetoed", a.vetoed),
        ("rejected", a.rejected),
        ("failed", a.failed),
    ] {
        metric(
            &format!("tern_automation_plans_{state}_total"),
            &format!("Automation plans that became {state}."),
            n,
        );
    }
    metric(
        "tern_automation_cycles_total",
        "Automation loop cycles run while leading.",
        a.cycles,
    );
    metric(
        "tern_automation_host_intervals_active_total",
        "Host-intervals with load the loop counted since this controller took office (SLATAH's \
         denominator: a powered-on host with VMs, once per round).",
        active,
    );
    metric(
        "tern_automation_host_intervals_overloaded_total",
        "Of those, host-intervals whose VMs' demand reached the host's cores (SLATAH's numerator).",
        overloaded,
    );
    let _ = writeln!(
        o,
        "# HELP tern_migration_prediction_error_ratio Mean |predicted - measured| / measured time \
         of the succeeded migrations that had a prediction.\n\
         # TYPE tern_migration_prediction_error_ratio gauge\n\
         tern_migration_prediction_error_ratio {predicted_err}\n\
         # HELP tern_migration_predictions_compared Succeeded migrations with a prediction and a \
         measured time.\n\
         # TYPE tern_migration_predictions_compared gauge\n\
         tern_migration_predictions_compared {predicted_n}"
    );
    let _ = writeln!(
        o,
        "# HELP tern_migration_overhead_seconds A move's measured time beyond the migration \
         model's: fixed seconds, and seconds per unit of the VM's CPU utilisation (learnt from \
         tern_migration_overhead_samples migrations; the prior before the first).\n\
         # TYPE tern_migration_overhead_seconds gauge\n\
         tern_migration_overhead_seconds{{part=\"fixed\"}} {}\n\
         tern_migration_overhead_seconds{{part=\"per_utilization\"}} {}\n\
         # HELP tern_migration_overhead_samples Migrations the overhead was learnt from.\n\
         # TYPE tern_migration_overhead_samples gauge\n\
         tern_migration_overhead_samples {overhead_n}",
        overhead.fixed_s, overhead.per_utilization_s
    );
    let _ = writeln!(
        o,
        "# HELP tern_vm_cpu_utilization Each VM's latest CPU utilisation from its agent (0..1 of \
         its vCPUs), as the automation loop reads it.\n# TYPE tern_vm_cpu_utilization gauge"
    );
    for (labels, u) in vm_cpu {
        let _ = writeln!(o, "tern_vm_cpu_utilization{labels} {u}");
    }
    let _ = writeln!(
        o,
        "# HELP tern_automation_cycle_seconds The last automation cycle's duration.\n\
         # TYPE tern_automation_cycle_seconds gauge\ntern_automation_cycle_seconds {}",
        a.last_cycle_s
    );
    o
}
