//! Reading back what the broker stored, through the broker's own SeaORM entities.

use co2_broker::storage::entities::{co2_emissions, devices, rejected_messages};
use sea_orm::{Database, DatabaseConnection, EntityTrait, PaginatorTrait, QueryOrder};

pub async fn connect(url: &str) -> DatabaseConnection {
    Database::connect(url)
        .await
        .expect("connect to the test database")
}

pub async fn reading_count(db: &DatabaseConnection) -> u64 {
    co2_emissions::Entity::find().count(db).await.unwrap_or(0)
}

pub async fn readings(db: &DatabaseConnection) -> Vec<co2_emissions::Model> {
    co2_emissions::Entity::find()
        .order_by_asc(co2_emissions::Column::Id)
        .all(db)
        .await
        .expect("select readings")
}

pub async fn rejections(db: &DatabaseConnection) -> Vec<rejected_messages::Model> {
    rejected_messages::Entity::find()
        .order_by_asc(rejected_messages::Column::Id)
        .all(db)
        .await
        .unwrap_or_default()
}

pub async fn devices(db: &DatabaseConnection) -> Vec<devices::Model> {
    devices::Entity::find()
        .order_by_asc(devices::Column::DeviceId)
        .all(db)
        .await
        .expect("select devices")
}
