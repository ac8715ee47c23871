//! `tenants:` in the provider file: how many tasks a tenant gets per turn in a queue's room
//! (`weights`), and what each tenant may spend and send, fleet-wide (`limits`, with
//! `default_limits` for every tenant not named there, each on its own).

use std::collections::BTreeMap;

use super::raw::{RawTenantLimits, RawTenants};
use super::{Errors, MAX_TENANT_WEIGHT, Result};

/// What a tenant at its budget does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnBudget {
    /// Its tasks wait in the room until the budget resets; other tenants go on.
    #[default]
    Wait,
    /// Its task steps down to a cheaper model of its plan whose call fits what is left, and
    /// waits when none does.
    Downgrade,
    /// Its task fails, with a sentence naming the tenant, the budget and when it resets.
    Fail,
}

/// One tenant's limits, shared by every worker (`quota/tenant_reserve.lua`). Budgets reset
/// at 00:00 UTC and on the 1st of the month (UTC); `rpm` and `tpm` count a sliding minute.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TenantLimits {
    pub budget_usd_day: Option<f64>,
    pub budget_usd_month: Option<f64>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    /// Calls of the tenant in flight at once, over the fleet.
    pub max_in_flight: Option<u64>,
    pub on_budget: OnBudget,
}

impl TenantLimits {
    /// The budget a call of `usd` can never fit, whatever is spent (more than its whole day
    /// or month): `budget_usd_day` or `budget_usd_month`, and the budget.
    #[must_use]
    pub fn never_fits(&self, usd: f64) -> Option<(&'static str, f64)> {
        let over = |b: Option<f64>| b.filter(|&b| usd > b);
        over(self.budget_usd_day)
            .map(|b| ("budget_usd_day", b))
            .or_else(|| over(self.budget_usd_month).map(|b| ("budget_usd_month", b)))
    }

    /// Whether any limit is set.
    #[must_use]
    pub fn any(&self) -> bool {
        self.budget_usd_day.is_some()
            || self.budget_usd_month.is_some()
            || self.rpm.is_some()
            || self.tpm.is_some()
            || self.max_in_flight.is_some()
    }
}

/// The `tenants:` section, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tenants {
    /// How many tasks a tenant gets per turn in a queue's room, for the tenants whose
    /// weight is not 1; the same on every worker.
    pub weights: BTreeMap<String, u32>,
    /// Limits by tenant.
    pub limits: BTreeMap<String, TenantLimits>,
    /// The limits of every tenant not in `limits`, each its own.
    pub default_limits: Option<TenantLimits>,
}

impl Tenants {
    /// The limits `tenant`'s calls meet; `None` for none (the hot path asks nothing more).
    #[must_use]
    pub fn limits_of(&self, tenant: &str) -> Option<&TenantLimits> {
        self.limits
            .get(tenant)
            .or(self.default_limits.as_ref())
            .filter(|l| l.any())
    }
}

/// Names a tenant as its tasks' `tenant` does.
fn tenant_name(errs: &Errors<'_>, key: String, tenant: &str) -> Result<()> {
    crate::envelope::check_class(None, Some(tenant)).map_err(|e| {
        errs.at(
            key,
            format!("is not a tenant name: {e}"),
            "name the tenant as its tasks' `tenant` does",
        )
    })
}

pub(super) fn tenants(errs: &Errors<'_>, raw: Option<RawTenants>) -> Result<Tenants> {
    let Some(raw) = raw else {
        return Ok(Tenants::default());
    };
    let mut weights = BTreeMap::new();
    for (tenant, weight) in raw.weights {
        let key = format!("tenants.weights.{tenant}");
        tenant_name(errs, key.clone(), &tenant)?;
        if !(1..=MAX_TENANT_WEIGHT).contains(&weight) {
            return Err(errs.at(
                key,
                format!("{weight} is not a weight"),
                "give how many tasks the tenant gets per turn, from 1 to 100",
            ));
        }
        if weight > 1 {
            weights.insert(tenant, u32::try_from(weight).unwrap_or(1));
        }
    }
    let mut limits = BTreeMap::new();
    for (tenant, raw) in raw.limits {
        let key = format!("tenants.limits.{tenant}");
        tenant_name(errs, key.clone(), &tenant)?;
        limits.insert(tenant, tenant_limits(errs, &key, raw)?);
    }
    let default_limits = match raw.default_limits {
        Some(raw) => Some(tenant_limits(errs, "tenants.default_limits", raw)?),
        None => None,
    };
    Ok(Tenants {
        weights,
        limits,
        default_limits,
    })
}

fn tenant_limits(errs: &Errors<'_>, key: &str, raw: RawTenantLimits) -> Result<TenantLimits> {
    let usd = |name: &str, v: Option<f64>| match v {
        Some(v) if !(v.is_finite() && v > 0.0) => Err(errs.at(
            format!("{key}.budget_usd.{name}"),
            format!("{v} is not a budget"),
            "give the dollars the tenant may spend, more than 0, e.g. 25.0",
        )),
        v => Ok(v),
    };
    let count = |name: &str, v: Option<u64>, what: &str| match v {
        Some(0) => Err(errs.at(
            format!("{key}.{name}"),
            "0 would stop every call of the tenant".to_owned(),
            what,
        )),
        v => Ok(v),
    };
    let budget = raw.budget_usd.unwrap_or_default();
    let on_budget = match raw.on_budget.as_deref() {
        None | Some("wait") => OnBudget::Wait,
        Some("downgrade") => OnBudget::Downgrade,
        Some("fail") => OnBudget::Fail,
        Some(other) => {
            return Err(errs.at(
                format!("{key}.on_budget"),
                format!(
                    "`{}` is not what a tenant at its budget can do",
                    other.escape_debug()
                ),
                "give wait, downgrade or fail",
            ));
        }
    };
    Ok(TenantLimits {
        budget_usd_day: usd("day", budget.day)?,
        budget_usd_month: usd("month", budget.month)?,
        rpm: count(
            "rpm",
            raw.rpm,
            "give the requests a minute the tenant may send, e.g. 60, or leave it out",
        )?,
        tpm: count(
            "tpm",
            raw.tpm,
            "give the tokens a minute the tenant may use, e.g. 100000, or leave it out",
        )?,
        max_in_flight: count(
            "max_in_flight",
            raw.max_in_flight,
            "give how many calls of the tenant may run at once, e.g. 8, or leave it out",
        )?,
        on_budget,
    })
}
