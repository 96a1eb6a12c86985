//! Index for "when did each device last report": `(device_id, received_at)`.
//!
//! The provisioned "device silent for 15 minutes" alert asks `MAX(received_at) ... GROUP BY
//! device_id` every minute over the whole table; without this index that is a full scan per
//! evaluation, which grows with every reading ever stored. With it, MySQL/MariaDB answer with a
//! loose index scan (one probe per device).

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261124_000002_last_seen_index"
    }
}

const INDEX: &str = "ix_co2_emissions_device_received";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name(INDEX)
                    .table(Alias::new("co2_emissions"))
                    .col(Alias::new("device_id"))
                    .col(Alias::new("received_at"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name(INDEX)
                    .table(Alias::new("co2_emissions"))
                    .to_owned(),
            )
            .await
    }
}
